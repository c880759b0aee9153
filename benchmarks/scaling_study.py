"""The default scaling study (tools/scaling_study.py with no flags), timed.

Figures, not assertions. Runs (or resumes) the study in --workdir while
sampling the machine's load average, then writes the `scaling_study` section
of benchmarks/RESULTS.md: the set-up, the wall time and load, the table of
branches, the fitted parameters of each error's frontier, and a comparison
of the sizes at matched compute (does a bigger model use compute more
efficiently?). --note adds a reading of the picture in words.

Rerunning on a finished workdir trains nothing: it reads the runs back and
reuses the wall time recorded by the run that trained them (timing.json).

Usage:
    KERAS_BACKEND=jax python benchmarks/scaling_study.py
    KERAS_BACKEND=jax python benchmarks/scaling_study.py --note "..." # after a look
"""

import argparse
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_vitscale.training import study  # noqa: E402
from keras_vitscale.training import study_report  # noqa: E402

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)


def _cpu_seconds():
    """CPU time of this process, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadSampler:
    """Samples the 1-minute load average every `every` seconds in a thread."""

    def __init__(self, every=15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def matched_compute(rows, small, big, column, points=5):
    """Mean ratio of `big`'s error to `small`'s at equal compute, over the
    overlap of their compute ranges (log-log interpolation between each
    variant's branches); None when the ranges do not overlap.

    Returns:
        (ratio, low compute, high compute) or None.
    """
    def curve(variant):
        pts = sorted((r["training_flops"], r[column]) for r in rows
                     if r["variant"] == variant and r[column] > 0)
        return np.log([p[0] for p in pts]), np.log([p[1] for p in pts])

    (xs, ys), (xb, yb) = curve(small), curve(big)
    if len(xs) < 2 or len(xb) < 2:
        return None
    low, high = max(xs[0], xb[0]), min(xs[-1], xb[-1])
    if low >= high:
        return None
    grid = np.linspace(low, high, points)
    ratio = np.exp(np.mean(np.interp(grid, xb, yb) - np.interp(grid, xs, ys)))
    return float(ratio), float(np.exp(low)), float(np.exp(high))


def comparison(rows, fits, shots):
    """Lines comparing the sizes at matched compute, and the frontier's makeup."""
    variants = sorted(dict.fromkeys(r["variant"] for r in rows),
                      key=lambda v: next(r["params"] for r in rows if r["variant"] == v))
    lines = []
    for column in study_report.error_columns(shots):
        name = "held-out error" if column == "heldout_error" else f"{shots}-shot error"
        frontier = [rows[i] for i in fits[column]["frontier"]]
        makeup = ", ".join(f"{v} {sum(r['variant'] == v for r in frontier)}" for v in variants)
        best = min(rows, key=lambda r: r[column])
        lines.append(f"- {name}: frontier points per size: {makeup}; lowest error "
                     f"{best[column]:.4f} ({best['variant']}, {best['steps']} steps, "
                     f"{best['training_flops']:.2e} FLOPs).")
        for small, big in zip(variants, variants[1:]):
            found = matched_compute(rows, small, big, column)
            if found is None:
                lines.append(f"  - {big} vs {small}: their compute ranges do not overlap.")
                continue
            ratio, low, high = found
            lines.append(f"  - {big} vs {small} at matched compute ({low:.2e} to {high:.2e} "
                         f"FLOPs): {big}'s error is {ratio:.2f}x {small}'s (geometric mean "
                         f"over the overlap; < 1: {big} uses compute better).")
    return "\n".join(lines)


def _timing_line(timing):
    if timing["wall_s"] is None:
        return "Not timed: the runs were trained before this script ran."
    load = timing["load"]
    return (f"Wall time {timing['wall_s'] / 60:.1f} min for {timing['runs_trained']} runs "
            "(parents and branches) on a shared machine: 1-minute load average during "
            f"the run min {load['min']:.1f}, mean {load['mean']:.1f}, max {load['max']:.1f} "
            f"on {timing['cpus']} cores (other agents' jobs). The study's own CPU time was "
            f"{timing['cpu_s'] / 60:.1f} min (user + system, all threads). The machine was "
            "never idle, so the idle wall time is not measured; without contention it "
            "should be about that CPU time, or less where both cores work.")


def section(result, timing, note):
    settings, plan, rows, fits = (result["settings"], result["plan"], result["rows"],
                                  result["fits"])
    shots = settings["shots"]
    sizes = ", ".join(f"{v} ({rows_of[0]['params']:,} params, "
                      f"{rows_of[0]['forward_flops_per_image'] / 1e6:.1f} MFLOPs/image)"
                      for v in plan
                      for rows_of in [[r for r in rows if r["variant"] == v]])
    branches = "; ".join(f"{v}: {p['branch_steps']} (cooldowns {p['cooldown_steps']})"
                         for v, p in plan.items())
    setup = (
        f"`python tools/scaling_study.py` with no flags (the embedded default study), "
        f"{timing['backend']} backend, {timing['cpus']} CPU cores. One long run per size "
        f"({settings['optimizer']} lr {settings['lr']}, {settings['schedule']} schedule, batch "
        f"{settings['batch_size']}, {settings['image_size']}x{settings['image_size']} digits, "
        f"patch {settings['patch_size']}, depth {settings['depth']}, the widths, MLP sizes and "
        "heads of Scaling ViT's Table 2) and one cooldown branch per branch step, cooling "
        f"down over the last {settings['cooldown_fraction']:.0%} of the branch.\n\n"
        f"- sizes: {sizes}\n- branch steps: {branches}\n"
        "- compute: 3 x analytic forward FLOPs per image x images seen by the branch "
        "(its parent's steps included)\n"
        "- held-out error: 1 - accuracy on the 360 held-out digits; "
        f"{shots}-shot error: 1 - mean accuracy (3 seeds) of the ridge few-shot probe on "
        "the pre-logits features, tested on the same 360")
    text = f"""\
{setup}

{_timing_line(timing)}

{study_report.format_table(rows, shots)}

Fits of E = a (C + d)^-b + c to each error's compute-optimal frontier (C in
FLOPs), with the plain power law E = a C^-b for contrast (study.png, fit.json):

```
{study_report.format_fits(fits)}
```

Sizes compared (automatic, from the table):
{comparison(rows, fits, shots)}
"""
    if note:
        text += f"\nReading of study.png: {note}\n"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join("runs", "scaling_study"),
                        help="the study's directory (default: runs/scaling_study)")
    parser.add_argument("--note", default="", help="a reading of study.png, in words")
    parser.add_argument("--no-write", action="store_true", help="print, do not write "
                        "RESULTS.md")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    timing_path = Path(args.workdir) / "timing.json"
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with LoadSampler() as sampler:
        result = study.run({"workdir": args.workdir}, progress=not args.no_progress)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    if result["trained"]:
        # The wall time of this call covers only the runs it trained: a study
        # resumed after a kill records its last part (runs_trained says so).
        samples = sampler.samples or [os.getloadavg()[0]]
        import keras

        timing = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                  "runs_trained": result["trained"],
                  "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "backend": keras.backend.backend(),
                  "load": {"min": min(samples), "mean": float(np.mean(samples)),
                           "max": max(samples), "samples": samples}}
        timing_path.write_text(json.dumps(timing, indent=2))
    if not timing_path.exists():  # trained by the tool, not timed here
        timing = {"wall_s": None, "runs_trained": 0, "cpus": os.cpu_count(),
                  "machine": platform.processor() or platform.machine(),
                  "backend": os.environ["KERAS_BACKEND"], "load": None}
    else:
        timing = json.loads(timing_path.read_text())
    text = section(result, timing, args.note)
    print(text)
    if not args.no_write:
        results.write_section("scaling_study", text,
                              "Scaling study in miniature (benchmarks/scaling_study.py)")
        print(f"wrote the scaling_study section of {results.RESULTS}")


if __name__ == "__main__":
    main()
