"""kvs-plot-schedule (`python tools/plot_schedule.py`): draw one or several
learning-rate schedules to a PNG.

Each --schedule is `decay_type[,key=value...]`; keys are those of
`kvs.schedules.create` (base_lr, warmup_steps, cooldown_steps, timescale,
shift, end, power) and default to the shared command-line values.

Example:
    kvs-plot-schedule --total-steps 1000000 --base-lr 8e-4 \\
        --warmup-steps 10000 --cooldown-steps 50000 \\
        --schedule rsqrt,timescale=10000 --schedule cosine \\
        --out schedules.png
"""

from keras_vitscale import schedules
from keras_vitscale.cli import common

PROG = "kvs-plot-schedule"
INT_KEYS = {"warmup_steps", "cooldown_steps"}


def build_parser():
    """The plotting tool's flags."""
    parser = common.parser("plot-schedule", __doc__.split(": ", 1)[1][0].upper()
                           + __doc__.split(": ", 1)[1][1:].replace("\n", " ", 1))
    parser.add_argument(
        "--schedule", action="append", required=True,
        help="decay_type[,key=value...]; repeat to overlay several "
        f"(decay types: {', '.join(schedules.DECAY_TYPES)})")
    parser.add_argument("--total-steps", type=int, required=True,
                        help="steps of the run the schedules are drawn for")
    parser.add_argument("--base-lr", type=float, default=1e-3,
                        help="peak learning rate of every schedule without base_lr=")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="linear warmup steps of every schedule without warmup_steps=")
    parser.add_argument("--cooldown-steps", type=int, default=0,
                        help="cooldown steps of every schedule without cooldown_steps=")
    parser.add_argument("--points", type=int, default=2000, help="steps sampled")
    parser.add_argument("--log-y", action="store_true", help="log-scale y axis")
    parser.add_argument("--out", default="schedule.png", help="PNG path")
    return parser


class _BadSchedule(ValueError):
    """A --schedule item that cannot be read."""


def parse_schedule(text, defaults):
    """'rsqrt,timescale=100' -> (label, kwargs for schedules.create)."""
    decay_type, *pairs = text.split(",")
    kwargs = dict(defaults, decay_type=decay_type.strip())
    for pair in pairs:
        if "=" not in pair:
            raise _BadSchedule(f"bad --schedule item {pair!r}: expected key=value")
        key, value = (p.strip() for p in pair.split("=", 1))
        try:
            kwargs[key] = int(float(value)) if key in INT_KEYS else float(value)
        except ValueError:
            raise _BadSchedule(f"bad --schedule item {pair!r}: {value!r} is not a "
                               "number") from None
    return text, kwargs


def main(argv=None):
    """Draws the schedules; returns the exit status (2: a bad --schedule)."""
    args = build_parser().parse_args(argv)
    import keras
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    defaults = {
        "base_lr": args.base_lr,
        "total_steps": args.total_steps,
        "warmup_steps": args.warmup_steps,
        "cooldown_steps": args.cooldown_steps,
    }
    curves = []
    for text in args.schedule:
        try:
            label, kwargs = parse_schedule(text, defaults)
            curves.append((label, schedules.create(**kwargs)))
        except _BadSchedule as err:
            return common.fail(str(err), PROG)
        except (ValueError, TypeError) as err:
            return common.fail(f"--schedule {text!r}: {err}", PROG)
    steps = np.unique(np.linspace(0, args.total_steps, args.points).round().astype("int64"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, schedule in curves:
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
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
