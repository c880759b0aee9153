"""Draw one or several learning-rate schedules to a PNG.

Each --schedule is `decay_type[,key=value...]`; keys are those of
`kvs.schedules.create` (base_lr, warmup_steps, cooldown_steps, timescale,
shift, end, power) and default to the shared command-line values.

Example:
    python tools/plot_schedule.py --total-steps 1000000 --base-lr 8e-4 \\
        --warmup-steps 10000 --cooldown-steps 50000 \\
        --schedule rsqrt,timescale=10000 --schedule cosine \\
        --out schedules.png
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "numpy")  # no accelerator needed

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_vitscale import schedules  # noqa: E402

INT_KEYS = {"warmup_steps", "cooldown_steps"}


def parse_schedule(text, defaults):
    """'rsqrt,timescale=100' -> (label, kwargs for schedules.create)."""
    decay_type, *pairs = text.split(",")
    kwargs = dict(defaults, decay_type=decay_type.strip())
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"bad --schedule item {pair!r}: expected key=value")
        key, value = (p.strip() for p in pair.split("=", 1))
        kwargs[key] = int(float(value)) if key in INT_KEYS else float(value)
    return text, kwargs


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--schedule",
        action="append",
        required=True,
        help="decay_type[,key=value...]; repeat to overlay several "
        f"(decay types: {', '.join(schedules.DECAY_TYPES)})",
    )
    parser.add_argument("--total-steps", type=int, required=True)
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--cooldown-steps", type=int, default=0)
    parser.add_argument("--points", type=int, default=2000, help="steps sampled")
    parser.add_argument("--log-y", action="store_true", help="log-scale y axis")
    parser.add_argument("--out", default="schedule.png", help="PNG path")
    args = parser.parse_args(argv)

    defaults = {
        "base_lr": args.base_lr,
        "total_steps": args.total_steps,
        "warmup_steps": args.warmup_steps,
        "cooldown_steps": args.cooldown_steps,
    }
    steps = np.unique(
        np.linspace(0, args.total_steps, args.points).round().astype("int64")
    )
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for text in args.schedule:
        label, kwargs = parse_schedule(text, defaults)
        try:
            schedule = schedules.create(**kwargs)
        except ValueError as e:
            raise SystemExit(f"--schedule {text!r}: {e}")
        lr = keras.ops.convert_to_numpy(schedule(steps.astype("float32")))
        ax.plot(steps, lr, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    if args.log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
