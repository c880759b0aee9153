"""Distillation on digits: a small student distilled from a larger teacher
vs the same student trained on the labels alone.

Figures, not assertions. Prints a table and writes it between the
`distillation` markers of benchmarks/RESULTS.md (other sections belong to
other benchmarks and are left untouched).

Everything goes through `keras_vitscale.training.train` (what
tools/pretrain.py and tools/distill.py run), on the bundled digits data
(1797 8x8 images upsampled to 32x32 RGB; 540 held-out images, so one image
is 0.19 points):
1. the teacher: the embedded default model (width 64, depth 4, patch 8),
   --teacher-steps steps, seed 0;
2. for each seed: the student (width 32, depth 2, MLP 128, 2 heads, patch 8)
   trained on the labels alone, and the same student distilled from the
   teacher (`--teacher WORKDIR`) at each --temperatures value with label
   weight --label-weight, all for --steps steps with the same optimizer,
   schedule, batch and data order (the seed sets init and data order).

Usage:
    KERAS_BACKEND=jax python benchmarks/distillation.py
    KERAS_BACKEND=jax python benchmarks/distillation.py --quick --no-write
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_vitscale.training import train  # noqa: E402

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)

# The default model's family (GAP, sincos2d, patch 8), narrower and shallower.
STUDENT = dict(width=32, depth=2, mlp_dim=128, num_heads=2)


def _run(workdir, steps, seed, **settings):
    """Held-out accuracy and seconds of one run (no few-shot, one eval at the end)."""
    summary = train({"workdir": str(workdir), "steps": steps, "seed": seed,
                     "eval_every": steps, "checkpoint_every": steps, "fewshot": "none",
                     **settings}, progress=False, log=lambda msg: None)
    return summary["val_accuracy"], summary["seconds"]


def _pct(values):
    mean = 100 * statistics.mean(values)
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{mean:.1f}{spread}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="student steps (default 600)")
    p.add_argument("--teacher-steps", type=int, default=1200, help="teacher steps")
    p.add_argument("--seeds", type=int, default=3, help="student seeds (default 3)")
    p.add_argument("--temperatures", default="1,2", help="distillation temperatures")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="weight of the label loss in the distilled runs (default 0)")
    p.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="120 student / 240 teacher steps, "
                   "one seed, T=1 (a smoke run)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    if args.quick:
        args.steps, args.teacher_steps, args.seeds, args.temperatures = 120, 240, 1, "1"
    temperatures = [float(t) for t in args.temperatures.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kvs_distill_"))
    started = time.perf_counter()

    teacher_dir = root / "teacher"
    teacher_acc, teacher_s = _run(teacher_dir, args.teacher_steps, 0)
    print(f"teacher (default model, {args.teacher_steps} steps): {100 * teacher_acc:.1f}% "
          f"in {teacher_s} s", flush=True)
    rows = {"labels only": []}
    rows.update({f"distilled, T={t:g}": [] for t in temperatures})
    for seed in range(args.seeds):
        acc, seconds = _run(root / f"labels_{seed}", args.steps, seed, **STUDENT)
        rows["labels only"].append(acc)
        print(f"seed {seed} labels only: {100 * acc:.1f}% ({seconds} s)", flush=True)
        for t in temperatures:
            acc, seconds = _run(root / f"distilled_t{t:g}_{seed}", args.steps, seed,
                                teacher=str(teacher_dir), distill_temperature=t,
                                distill_label_weight=args.label_weight, **STUDENT)
            rows[f"distilled, T={t:g}"].append(acc)
            print(f"seed {seed} distilled T={t:g}: {100 * acc:.1f}% ({seconds} s)", flush=True)

    params = {name: json.loads((root / run / "model" / "metadata.json").read_text())
              ["parameter_count"] for name, run in (("teacher", "teacher"),
                                                     ("student", "labels_0"))}
    lines = [
        f"Held-out accuracy (%) on digits (540 images; one image = 0.19 points), "
        f"mean ± std over seeds {', '.join(str(s) for s in range(args.seeds))}. "
        f"Teacher: the default model ({params['teacher']:,} params, width 64, depth 4), "
        f"{args.teacher_steps} steps, seed 0. Student: width 32, depth 2, MLP 128, "
        f"2 heads, patch 8 ({params['student']:,} params), {args.steps} steps of batch 64, "
        f"Adam, cosine, lr 2e-3, the same settings in every row; distilled rows use "
        f"`--teacher TEACHER_WORKDIR --label-weight {args.label_weight:g}`.",
        "",
        "| model | accuracy | vs teacher | per seed |",
        "|---|---|---|---|",
        f"| teacher | {100 * teacher_acc:.1f} | | |",
    ]
    for name, accs in rows.items():
        gap = 100 * (statistics.mean(accs) - teacher_acc)
        lines.append(f"| student, {name} | {_pct(accs)} | {gap:+.1f} | "
                     f"{', '.join(f'{100 * a:.1f}' for a in accs)} |")
    lines += ["", f"Keras {keras.version()}, {keras.backend.backend()} backend, "
              f"{platform.machine()} CPU ({os.cpu_count()} cores, shared with other "
              f"jobs while it ran); {time.perf_counter() - started:.0f} s in all. "
              "Reproduce: `KERAS_BACKEND=jax python benchmarks/distillation.py`."]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        results.write_section("distillation", text,
                              "Distillation on digits (benchmarks/distillation.py)")


if __name__ == "__main__":
    main()
