"""Head against body weight decay, and tok / gap / map heads, in miniature.

The Scaling ViT paper's recipe finding: a much stronger weight decay on the
head than on the body raises few-shot transfer while it lowers upstream
accuracy (its heat map of head against body weight decay); and its section
on removing the class token compares heads. Both, at the scale of the
bundled digits data, on the main job's split: pretrain on the digits 0-5
(upstream accuracy on their held-out split), then a 10-shot ridge on the
pre-logits of the digits 6-9 (classes never trained on; examples from their
train split, accuracy on their held-out split).

Every run is the default run's training (Adam, cosine, batch 64, the small
ViT; `training.settings.resolve` and `trainer.build_optimizer`) for
--steps steps with the decay rates of its cell: decoupled, on kernels, the
head's rate for head/kernel and the body's for every other kernel (0 is
off). Grid values are multiples of the recipe's body 0.03 and head 3.0.

- grid mode (default): --head-wds x --body-wds x --seeds.
- `--heads`: `tok`, `gap` and `map` pooling at the default decay, with the
  training step's memory from XLA (`planning.compiled_step`, compiled,
  never run) and from the analytic planner (`planning.estimate`).

Resumable: each finished run is one line of WORKDIR/results.jsonl and a
rerun skips it; kill and rerun the same command to continue. At the end it
writes benchmarks/head_weight_decay.png (two heat maps) and the
`head_weight_decay` / `heads` sections of benchmarks/RESULTS.md.

Usage:
    KERAS_BACKEND=jax python benchmarks/head_weight_decay.py
    KERAS_BACKEND=jax python benchmarks/head_weight_decay.py --heads
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)

HERE = Path(__file__).resolve().parent
PNG = HERE / "head_weight_decay.png"
RESULTS_FILE = "results.jsonl"
UPSTREAM, DOWNSTREAM = "digits:0-5", "digits:6-9"
# Multiples (0, 0.1x, 1x, 10x) of the recipe's body 0.03 and head 3.0.
BODY_WDS = (0.0, 0.003, 0.03, 0.3)
HEAD_WDS = (0.0, 0.3, 3.0, 30.0)
POOLINGS = ("tok", "gap", "map")
SHOTS = 10
FEWSHOT_SEEDS = 5
KEY_FIELDS = ("mode", "head_wd", "body_wd", "pooling", "seed", "steps")


def run_key(run):
    """The fields that identify a run (its cell, seed and length)."""
    return tuple(run[k] for k in KEY_FIELDS)


def read_results(path):
    """The finished runs in a results.jsonl ([] if none); a last line cut
    by a kill is ignored (the run reruns)."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def sweep(runs, run_fn, path, log=print):
    """Runs each run not yet in `path`, appending its result as it finishes.

    Args:
        runs: dicts with the `KEY_FIELDS`.
        run_fn: run dict -> dict of measurements.
        path: the results.jsonl file (created with its directory).
        log: a function taking a message.

    Returns:
        Every finished run's row (earlier ones included), in file order.

    Example:
    ```python
    rows = sweep([{"mode": "grid", "head_wd": 3.0, "body_wd": 0.03,
                   "pooling": "gap", "seed": 0, "steps": 300}], run_one, "runs/hwd/results.jsonl")
    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as f:  # a line cut by a kill: end it, so it stays alone
            f.write("\n")
    done = {run_key(r) for r in read_results(path)}
    todo = [r for r in runs if run_key(r) not in done]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already in {path}; {len(todo)} to go")
    for i, run in enumerate(todo, 1):
        started = time.perf_counter()
        row = {**run, **run_fn(run), "seconds": round(time.perf_counter() - started, 1)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"[{i}/{len(todo)}] {json.dumps(row)}")
    return read_results(path)


class Trainer:
    """Trains and measures one run; data sources and datasets are made once."""

    def __init__(self, batch_size=64):
        from keras_vitscale import data

        self.data = data
        self.size = (32, 32)
        self.batch_size = batch_size
        self.upstream = data.load_source(UPSTREAM, image_size=self.size)
        self.downstream = data.load_source(DOWNSTREAM, image_size=self.size)
        self.eval_ds = data.eval_dataset(self.upstream, 256, self.size)
        self._down_features = {}

    def settings(self, run):
        from keras_vitscale.training import settings as settings_lib

        config, explicit = settings_lib.resolve(dict(
            dataset=UPSTREAM, steps=run["steps"], seed=run["seed"], pooling=run["pooling"],
            weight_decay=run["body_wd"], head_weight_decay=run["head_wd"], fewshot="none",
            batch_size=self.batch_size))
        config["num_classes"] = self.upstream.num_classes
        return config, settings_lib.model_config(config, explicit)

    def __call__(self, run):
        import keras

        from keras_vitscale.evaluation.on_source import fewshot_on_source
        from keras_vitscale.model import ViT
        from keras_vitscale.training import losses
        from keras_vitscale.training.settings import build_schedule
        from keras_vitscale.training.trainer import build_optimizer

        config, vit_config = self.settings(run)
        keras.utils.set_random_seed(run["seed"])
        model = ViT(config=vit_config)
        schedule = build_schedule(config)
        model.compile(optimizer=build_optimizer(config, schedule),
                      loss=losses.get(config["loss"]),
                      weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        train_ds = self.data.train_dataset(self.upstream, self.batch_size, self.size,
                                           run["seed"], crop=config["train_crop"],
                                           flip=config["flip"])
        model.fit(train_ds, epochs=1, steps_per_epoch=run["steps"], verbose=0)
        upstream = model.evaluate(self.eval_ds, verbose=0, return_dict=True)["accuracy"]
        result = fewshot_on_source(model, self.downstream, self.size, shots=[SHOTS],
                                   seeds=FEWSHOT_SEEDS)
        row = {"upstream": round(float(upstream), 4),
               "fewshot10": round(float(result.mean[SHOTS]), 4)}
        if run["mode"] == "heads":
            row.update(step_memory(vit_config, self.batch_size))
        keras.backend.clear_session()
        return row


def step_memory(vit_config, batch_size):
    """The training step's bytes: XLA's memory analysis of the compiled step
    (`planning.compiled_step`, float32, Adam with a bfloat16 first moment as
    the default run's) and the analytic planner's estimate."""
    from keras_vitscale import planning
    from keras_vitscale.planning import compiled_step

    step = compiled_step.compile_train_step(vit_config, "data:1", "bf16_adam",
                                            batch_per_shard=batch_size,
                                            dtype_policy="float32")
    est = planning.estimate(vit_config, batch_size=batch_size, optimizer="bf16_adam")
    return {"xla_peak": step.peak, "xla_temps": step.temps,
            "plan_total": est.per_device["total"],
            "plan_activations": est.per_device.get("activations")}


def grid_runs(head_wds, body_wds, seeds, steps):
    return [dict(mode="grid", head_wd=h, body_wd=b, pooling="gap", seed=s, steps=steps)
            for s in seeds for h in head_wds for b in body_wds]


def head_runs(seeds, steps):
    return [dict(mode="heads", head_wd=None, body_wd=None, pooling=p, seed=s, steps=steps)
            for s in seeds for p in POOLINGS]


def cell_stats(rows, field, keys):
    """{cell key: (mean, spread, n)} of `field` over seeds; spread is the
    sample standard deviation (0 with one seed)."""
    cells = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in keys), []).append(r[field])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for k, v in cells.items()}


def plot(rows, head_wds, body_wds, path=PNG):
    """Two heat maps side by side: upstream accuracy and downstream 10-shot
    accuracy, x = body weight decay, y = head weight decay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (field, title) in zip(axes, (("upstream", "upstream accuracy (digits 0-5)"),
                                         ("fewshot10", "10-shot accuracy (digits 6-9)"))):
        stats = cell_stats(rows, field, ("head_wd", "body_wd"))
        grid = np.full((len(head_wds), len(body_wds)), np.nan)
        for i, h in enumerate(head_wds):
            for j, b in enumerate(body_wds):
                if (h, b) in stats:
                    grid[i, j] = stats[(h, b)][0]
        im = ax.imshow(grid, origin="lower", cmap="viridis")
        for i in range(len(head_wds)):
            for j in range(len(body_wds)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center",
                            color="white" if grid[i, j] < np.nanmean(grid) else "black",
                            fontsize=8)
        ax.set_xticks(range(len(body_wds)), [_wd_label(b) for b in body_wds])
        ax.set_yticks(range(len(head_wds)), [_wd_label(h) for h in head_wds])
        ax.set_xlabel("body weight decay")
        ax.set_ylabel("head weight decay")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _wd_label(value):
    return "0" if value == 0 else f"{value:g}"


def _pm(stat):
    mean, spread, n = stat
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def grid_report(rows, head_wds, body_wds, args, machine):
    up = cell_stats(rows, "upstream", ("head_wd", "body_wd"))
    down = cell_stats(rows, "fewshot10", ("head_wd", "body_wd"))
    seeds = sorted({r["seed"] for r in rows})
    header = "| head wd \\ body wd | " + " | ".join(_wd_label(b) for b in body_wds) + " |"
    sep = "|---" * (len(body_wds) + 1) + "|"
    lines = [f"Pretrain on {UPSTREAM}, {args.steps} steps each (the default run's "
             f"Adam/cosine/GAP small ViT, batch 64), seeds {seeds}; upstream = held-out "
             f"accuracy on {UPSTREAM}, downstream = {SHOTS}-shot ridge accuracy on "
             f"{DOWNSTREAM} (mean of {FEWSHOT_SEEDS} draws). Cells: mean ± sample std "
             f"over seeds, in %. {machine}. Figure: benchmarks/head_weight_decay.png.",
             ""]
    for stats, name in ((up, "Upstream held-out accuracy"),
                        (down, f"Downstream {SHOTS}-shot accuracy")):
        lines += [f"{name}:", "", header, sep]
        for h in head_wds:
            cells = [_pm(stats[(h, b)]) if (h, b) in stats else "n/a" for b in body_wds]
            lines.append(f"| {_wd_label(h)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(reading(up, down, head_wds, body_wds))
    return "\n".join(lines)


def reading(up, down, head_wds, body_wds):
    """The plain-words answer: going from no head decay to the highest, at
    each body decay, does downstream rise and upstream fall, beyond the
    spread?"""
    lo, hi = head_wds[0], head_wds[-1]
    parts, down_up, up_down = [], 0, 0
    for b in body_wds:
        if (lo, b) not in up or (hi, b) not in up:
            continue
        du = up[(hi, b)][0] - up[(lo, b)][0]
        dd = down[(hi, b)][0] - down[(lo, b)][0]
        noise_u = max(up[(hi, b)][1], up[(lo, b)][1])
        noise_d = max(down[(hi, b)][1], down[(lo, b)][1])
        down_up += dd > noise_d
        up_down += du < -noise_u
        parts.append(f"body {_wd_label(b)}: downstream {100 * dd:+.1f} (spread "
                     f"{100 * noise_d:.1f}), upstream {100 * du:+.1f} (spread "
                     f"{100 * noise_u:.1f})")
    n = len(parts)
    return (f"Reading (head decay {_wd_label(lo)} -> {_wd_label(hi)} at each body decay; a "
            "change counts when it exceeds the larger of the two cells' spreads): "
            + "; ".join(parts) + f". Downstream rises beyond the spread in {down_up} of {n} "
            f"columns and upstream falls beyond it in {up_down} of {n}. "
            + ("So here high head decay does raise few-shot transfer and lower upstream "
               "accuracy, as in the paper." if n and down_up == n and up_down == n else
               "So the paper's pattern (few-shot up, upstream down) is "
               + ("not" if down_up == 0 and up_down == 0 else "only partly")
               + " reproduced at this scale; read the table's spreads before any "
               "conclusion."))


def heads_report(rows, args, machine):
    up = cell_stats(rows, "upstream", ("pooling",))
    down = cell_stats(rows, "fewshot10", ("pooling",))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Pretrain on {UPSTREAM}, {args.steps} steps, the default run with each "
             f"pooling (default weight decay), seeds {seeds}; mean ± sample std in %. "
             "Memory of one training step (batch 64, float32, Adam with a bfloat16 first "
             "moment): XLA = `memory_analysis()` of the compiled step "
             "(`planning.compiled_step`: arguments + new outputs + temporaries, CPU), "
             f"planner = `kvs.planning.estimate` total. {machine}.", "",
             "| pooling | upstream acc | 10-shot on digits 6-9 | XLA step peak | "
             "planner total |", "|---|---|---|---|---|"]
    from keras_vitscale.planning import format_bytes

    for p in POOLINGS:
        if (p,) not in up:
            continue
        mem = next(r for r in rows if r["pooling"] == p)
        lines.append(f"| {p} | {_pm(up[(p,)])} | {_pm(down[(p,)])} | "
                     f"{format_bytes(mem['xla_peak'])} | {format_bytes(mem['plan_total'])} |")
    return "\n".join(lines)


def _floats(text):
    return tuple(float(v) for v in text.split(","))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", action="store_true", help="tok / gap / map instead of the grid")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--head-wds", type=_floats, default=HEAD_WDS)
    p.add_argument("--body-wds", type=_floats, default=BODY_WDS)
    p.add_argument("--workdir", default=os.path.join("runs", "head_weight_decay"))
    p.add_argument("--no-write", action="store_true", help="no PNG, no RESULTS.md")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.heads:
        runs = head_runs(seeds, args.steps)
    else:
        runs = grid_runs(args.head_wds, args.body_wds, seeds, args.steps)
    rows = sweep(runs, Trainer(), Path(args.workdir) / RESULTS_FILE)
    wanted = {run_key(r) for r in runs}
    rows = [r for r in rows if run_key(r) in wanted]
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), "
               f"backend {os.environ['KERAS_BACKEND']}")
    if args.heads:
        text = heads_report(rows, args, machine)
        print(text)
        if not args.no_write:
            results.write_section("heads", text, "Heads in miniature: tok, gap, map")
        return 0
    text = grid_report(rows, args.head_wds, args.body_wds, args, machine)
    print(text)
    if not args.no_write:
        plot(rows, args.head_wds, args.body_wds)
        results.write_section("head_weight_decay", text, "Head against body weight decay")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
