"""Distillation on digits: a small student distilled from a larger teacher
vs the same student trained on the labels alone.

Figures, not assertions. Prints a table and writes it between the
`distillation` markers of benchmarks/RESULTS.md (other sections belong to
other benchmarks and are left untouched).

Everything goes through `keras_vitscale.training.train` (what
tools/pretrain.py and tools/distill.py run), on the bundled digits data
(1797 8x8 images upsampled to 32x32 RGB; 360 held-out images, so one image
is 0.28 points):
1. the teacher: the embedded default model (width 64, depth 4, patch 8),
   --teacher-steps steps, seed 0, no augmentation;
2. for each setup and seed: the student (width 32, depth 2, MLP 128, 2
   heads, patch 8) trained on the labels alone, and the same student
   distilled from the teacher (`--teacher WORKDIR`, label weight
   --label-weight) at each --temperatures value, for the same steps with the
   same optimizer, schedule, batch, augmentation and data order (the seed
   sets init and data order). Setups:
   - "plain": 600 steps, no augmentation (the default pipeline);
   - "crops": 1800 steps with random-resized ("inception") crops, where a
     crop may cut a digit so that its label no longer fits, while the
     teacher labels each crop as it sees it (the "consistent teaching" of
     Beyer et al. 2022).

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
SETUPS = {
    "plain": dict(steps=600),
    "crops": dict(steps=1800, train_crop="inception"),
}


def _run(workdir, seed, steps, **settings):
    """Held-out accuracy and seconds of one run (no few-shot, one eval at the end)."""
    # All ten digits (the pretraining default is the digits 0-5 class split).
    summary = train({"workdir": str(workdir), "dataset": "digits", "steps": steps, "seed": seed,
                     "eval_every": steps, "checkpoint_every": steps, "fewshot": "none",
                     **settings}, progress=False, log=lambda msg: None)
    return summary["val_accuracy"], summary["seconds"]


def _pct(values):
    mean = 100 * statistics.mean(values)
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{mean:.1f}{spread}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default=",".join(SETUPS), help="which setups (default: all)")
    p.add_argument("--teacher-steps", type=int, default=1200, help="teacher steps")
    p.add_argument("--seeds", type=int, default=3, help="student seeds (default 3)")
    p.add_argument("--temperatures", default="1", help="distillation temperatures, e.g. "
                   "'1,2' (default 1)")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="weight of the label loss in the distilled runs (default 0)")
    p.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="a smoke run: teacher 240 steps, "
                   "students a fifth of their steps, one seed")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    setups = {name: dict(SETUPS[name]) for name in args.setups.split(",")}
    if args.quick:
        args.teacher_steps, args.seeds = 240, 1
        for setup in setups.values():
            setup["steps"] //= 5
    temperatures = [float(t) for t in args.temperatures.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kvs_distill_"))
    started = time.perf_counter()

    teacher_dir = root / "teacher"
    teacher_acc, teacher_s = _run(teacher_dir, 0, args.teacher_steps)
    print(f"teacher ({args.teacher_steps} steps): {100 * teacher_acc:.1f}% "
          f"({teacher_s} s)", flush=True)
    results_by_row = {}
    for name, setup in setups.items():
        runs = {"labels only": {}}
        runs.update({f"distilled, T={t:g}": dict(teacher=str(teacher_dir),
                                                 distill_temperature=t,
                                                 distill_label_weight=args.label_weight)
                     for t in temperatures})
        for row, extra in runs.items():
            accs = []
            for seed in range(args.seeds):
                tag = row.replace(", ", "_").replace(" ", "_").replace("=", "")
                acc, seconds = _run(root / f"{name}_{tag}_{seed}", seed,
                                    **setup, **STUDENT, **extra)
                accs.append(acc)
                print(f"{name}, {row}, seed {seed}: {100 * acc:.1f}% ({seconds} s)",
                      flush=True)
            results_by_row[(name, row)] = accs

    def params(run):
        meta = json.loads((root / run / "model" / "metadata.json").read_text())
        return meta["parameter_count"]

    first = next(iter(setups))
    lines = [
        "Held-out accuracy (%) on digits (360 images; one image = 0.28 points), mean ± "
        f"std over seeds {', '.join(str(s) for s in range(args.seeds))}. Teacher: the "
        f"default model ({params('teacher'):,} params: width 64, depth 4, patch 8), "
        f"{args.teacher_steps} steps, no augmentation, seed 0. Student: width 32, depth 2, "
        f"MLP 128, 2 heads, patch 8 ({params(f'{first}_labels_only_0'):,} params); every "
        "run uses the default recipe (BF16Adam, cosine, lr 2e-3, batch 64). Setups: "
        + "; ".join(f"**{name}** {setup['steps']} steps"
                    + (f", `--train-crop {setup['train_crop']}`" if "train_crop" in setup
                       else ", no augmentation") for name, setup in setups.items())
        + f". Distilled rows: `--teacher TEACHER_WORKDIR --label-weight "
        f"{args.label_weight:g}` (they never see a label when it is 0).",
        "",
        "| setup | model | accuracy | vs teacher | per seed |",
        "|---|---|---|---|---|",
        f"| | teacher | {100 * teacher_acc:.1f} | | |",
    ]
    for (name, row), accs in results_by_row.items():
        gap = 100 * (statistics.mean(accs) - teacher_acc)
        lines.append(f"| {name} | student, {row} | {_pct(accs)} | {gap:+.1f} | "
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
