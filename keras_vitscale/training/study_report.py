"""The scaling study's report: its CSV rows, compute-optimal frontier, fits,
plot and tables (the running is `training/study.py`).

Each finished branch is one row: its training compute (3 x the forward
FLOPs per image x the images seen) and its held-out and k-shot errors. The
frontier of each error is fitted with E = a (C + d)^-b + c
(`kvs.scaling.fit_power_law`).

Example:
```python
from keras_vitscale.training import study_report
rows = study_report.read_csv("runs/scaling_study/study.csv")
print(study_report.format_fits(study_report.fit_study(rows, 10)))
```
"""

import csv
import io
import math
from pathlib import Path

from keras_vitscale import scaling
from keras_vitscale.config import ViTConfig
from keras_vitscale.training import run_log

# A backward pass costs about two forward passes (the gradients with respect
# to activations and to weights each take one matmul per forward matmul).
TRAINING_FLOPS_PER_FORWARD = 3


def error_columns(shots):
    """The CSV columns holding the errors the study fits."""
    return ("heldout_error", f"fewshot{shots}_error")


def read_branch(workdir, variant, shots):
    """A finished branch's CSV row, read from its workdir; None if unfinished.

    A branch is finished once its few-shot results are written: the trainer
    writes fewshot.json last, after the final evaluation and checkpoint.

    Args:
        workdir: the branch's run directory.
        variant: its variant name (the row's label).
        shots: the few-shot column to read.

    Returns:
        {"variant", "params", "forward_flops_per_image", "branch_step",
        "cooldown_steps", "steps", "batch_size", "images_seen",
        "training_flops", "heldout_error", "fewshotK_error"} or None.

    Example:
    ```python
    read_branch("runs/study/runs/Ti/branch_00000080", "Ti", 10)["training_flops"]
    ```
    """
    workdir = Path(workdir)
    paths = [workdir / n for n in ("config.json", "metrics.jsonl", "fewshot.json")]
    if not all(p.exists() for p in paths):
        return None
    config = run_log.read_json(paths[0])
    rows = run_log.read_metrics(paths[1])
    last = rows[-1] if rows else {}
    fewshot = run_log.read_json(paths[2])
    if last.get("step") != config["steps"] or "val_accuracy" not in last \
            or str(shots) not in fewshot:
        return None
    vit = ViTConfig.from_dict(config["model"])
    forward = vit.flops_per_image()
    images = config["steps"] * config["batch_size"]
    return {"variant": variant, "params": vit.count_params(),
            "forward_flops_per_image": forward, "branch_step": config["branch"]["step"],
            "cooldown_steps": config["cooldown_steps"], "steps": config["steps"],
            "batch_size": config["batch_size"], "images_seen": images,
            "training_flops": TRAINING_FLOPS_PER_FORWARD * forward * images,
            "heldout_error": 1.0 - float(last["val_accuracy"]),
            f"fewshot{shots}_error": 1.0 - float(fewshot[str(shots)])}


def write_csv(rows, path):
    """Writes the rows (dicts with the same keys) to a CSV file, atomically."""
    if not rows:
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    run_log.write_text_atomic(path, out.getvalue())


def read_csv(path):
    """study.csv back as rows, numbers as int or float."""
    def number(text):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    with open(path, newline="") as f:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def pareto_frontier(compute, error):
    """Indices of the compute-optimal points: those whose error is lower than
    that of every point with less or equal compute; by increasing compute.

    Example:
    ```python
    pareto_frontier([1, 2, 3, 4], [0.5, 0.6, 0.3, 0.3])  # [0, 2]
    ```
    """
    order = sorted(range(len(compute)), key=lambda i: (compute[i], error[i]))
    frontier, best = [], math.inf
    for i in order:
        if error[i] < best:
            frontier.append(i)
            best = error[i]
    return frontier


def fit_frontier(compute, error):
    """Fits the saturating power law to the frontier of (compute, error).

    Points with zero error are left out (the fit is on a log scale). The
    form follows the frontier's size: 4+ points E = a (C + d)^-b + c, 3
    points E = a C^-b + c, 2 points E = a C^-b, fewer no fit.

    Args:
        compute, error: one value per branch.

    Returns:
        {"fit": a `PowerLawFit` or None, "frontier": indices into the
        inputs, "note": what was left out or why there is no fit ("" if
        nothing)}.

    Example:
    ```python
    fit_frontier(rows_compute, rows_error)["fit"].b
    ```
    """
    notes = []
    kept = [i for i, e in enumerate(error) if e > 0]
    if len(kept) < len(error):
        notes.append(f"{len(error) - len(kept)} point(s) with zero error left out")
    frontier = [kept[i] for i in pareto_frontier([compute[i] for i in kept],
                                                 [error[i] for i in kept])]
    x = [compute[i] for i in frontier]
    y = [error[i] for i in frontier]
    fit = None
    try:
        if len(frontier) >= 4:
            fit = scaling.fit_power_law(x, y)
        elif len(frontier) == 3:
            fit = scaling.fit_power_law(x, y, fit_shift=False)
            notes.append("3 frontier points: d held at 0")
        elif len(frontier) == 2:
            fit = scaling.fit_plain_power_law(x, y)
            notes.append("2 frontier points: plain power law only")
        else:
            notes.append(f"{len(frontier)} frontier point(s): nothing to fit")
    except (ValueError, RuntimeError) as err:  # report it, keep the study's data
        notes.append(f"fit failed: {err}")
    if fit is not None and len(frontier) <= 4:
        # As many points as parameters: the curve passes through every point
        # and the standard errors are undefined (printed as nan).
        notes.append("an exact fit, no uncertainty")
    return {"fit": fit, "frontier": frontier, "note": "; ".join(notes)}


def fit_study(rows, shots):
    """`fit_frontier` of each error column against training FLOPs.

    Returns:
        {column: fit_frontier's dict}.
    """
    compute = [float(r["training_flops"]) for r in rows]
    return {column: fit_frontier(compute, [float(r[column]) for r in rows])
            for column in error_columns(shots)}


def _json_number(value):
    """`value` with non-finite floats as None (JSON has no inf or NaN: an
    exact fit's undefined standard errors are written as null)."""
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_number(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fit_record(result, rows, column):
    """fit.json's entry for one error column: the note, the frontier's rows
    and, when fitted, the parameters (and the plain power law's); undefined
    values are null."""
    fit = result["fit"]
    record = {"note": result["note"],
              "frontier": [{k: rows[i][k] for k in ("variant", "branch_step", "training_flops",
                                                    column)} for i in result["frontier"]]}
    if fit is not None:
        record.update(form=fit.form, a=fit.a, b=fit.b, c=fit.c, d=fit.d, stderr=fit.stderr,
                      rms_log_residual=fit.rms_log_residual)
        if fit.plain is not None:
            record["plain"] = dict(a=fit.plain.a, b=fit.plain.b, stderr=fit.plain.stderr,
                                   rms_log_residual=fit.plain.rms_log_residual)
    return _json_number(record)


def plot_study(rows, fits, out, shots):
    """study.png: one panel per error, against training FLOPs on log-log axes.

    Each variant's branches are joined in its own colour; the frontier
    points are ringed; the fitted law (black), the plain power law (grey,
    dashed) and the fitted floor c (dotted) are drawn over them.

    Args:
        rows: the study's rows.
        fits: `fit_study`'s result.
        out: the image path.
        shots: the few-shot column's k.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    titles = {"heldout_error": "held-out error", f"fewshot{shots}_error": f"{shots}-shot error"}
    columns = error_columns(shots)
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.8))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for ax, column in zip(axes, columns):
        for k, variant in enumerate(variants):
            points = sorted((r["training_flops"], r[column], r["params"]) for r in rows
                            if r["variant"] == variant and r[column] > 0)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{k}",
                        label=f"{variant} ({points[0][2] / 1e6:.2g}M params)")
        result = fits[column]
        frontier = result["frontier"]
        ax.scatter([rows[i]["training_flops"] for i in frontier],
                   [rows[i][column] for i in frontier], s=150, facecolors="none",
                   edgecolors="black", zorder=3, label="frontier (fitted)")
        if result["fit"] is not None:
            scaling.plot_fit(ax, result["fit"], [r["training_flops"] for r in rows],
                             extrapolate=3.0, color="black", plain_color="gray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs (3 x forward x images seen)")
        ax.set_ylabel(titles[column])
        ax.set_title(titles[column] + (f"\n({result['note']})" if result["note"] else ""),
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def format_table(rows, shots):
    """The rows as a Markdown table (FLOPs in scientific notation).

    Example:
    ```python
    print(format_table(read_csv("runs/study/study.csv"), 10))
    ```
    """
    k = f"fewshot{shots}_error"
    lines = ["| variant | params | branch step | cooldown | steps | training FLOPs "
             f"| held-out error | {shots}-shot error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['branch_step']} | "
                     f"{r['cooldown_steps']} | {r['steps']} | {r['training_flops']:.3e} | "
                     f"{r['heldout_error']:.4f} | {r[k]:.4f} |")
    return "\n".join(lines)


def format_fits(fits):
    """The fitted parameters of each error, as plain text."""
    blocks = []
    for column, result in fits.items():
        head = f"{column} (frontier of {len(result['frontier'])} points"
        head += f"; {result['note']})" if result["note"] else ")"
        body = str(result["fit"]) if result["fit"] is not None else "no fit"
        blocks.append(head + "\n" + body)
    return "\n\n".join(blocks)


