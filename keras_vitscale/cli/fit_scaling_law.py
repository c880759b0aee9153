"""kvs-fit-scaling-law (`python tools/fit_scaling_law.py`): fits
E = a (C + d)^-b + c to a CSV of runs and plots it on log-log axes.

Example:
    kvs-fit-scaling-law runs.csv --out fit.png
    kvs-fit-scaling-law runs.csv --compute-column core_days \\
        --error-column imagenet_10shot_error --out fit.png
"""

import csv

from keras_vitscale.cli import common

PROG = "kvs-fit-scaling-law"


def build_parser():
    """The fitting tool's flags."""
    parser = common.parser(
        "fit-scaling-law",
        "Fit the Scaling ViT double-saturating power law "
        "E = a (C + d)^-b + c (and a plain E = a C^-b for contrast) to "
        "(compute, error) pairs from a CSV file with a header row; print "
        "the parameters with standard errors and draw points and curves "
        "on log-log axes.",
        epilog=f"Example: {PROG} runs.csv --out fit.png")
    parser.add_argument("csv", help="CSV file with a header row, one run per line.")
    parser.add_argument("--out", default="fit.png", help="image to write (default: fit.png; .png, .pdf or .svg).")
    parser.add_argument("--compute-column", default="compute", help="column holding compute, any positive unit (default: compute).")
    parser.add_argument("--error-column", default="error", help="column holding the error, e.g. 1 - accuracy (default: error).")
    parser.add_argument("--no-shift", action="store_true", help="hold d = 0 and fit E = a C^-b + c (3 parameters).")
    parser.add_argument("--title", default=None, help="plot title (default: the CSV file name).")
    parser.add_argument("--extrapolate", type=float, default=10.0, help="draw the curves up to this factor beyond the largest compute (default: 10).")
    return parser


def read_columns(path, compute_column, error_column):
    """(compute, error) lists from the CSV; ValueError naming the line or
    column that is wrong."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (compute_column, error_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: no column {missing[0]!r}; the header has "
                f"{reader.fieldnames}. Pick columns with --compute-column and "
                "--error-column.")
        compute, error = [], []
        for line, row in enumerate(reader, start=2):
            try:
                compute.append(float(row[compute_column]))
                error.append(float(row[error_column]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{line}: {row[compute_column]!r}, {row[error_column]!r} "
                    "is not a pair of numbers; fix or delete that line.") from None
    return compute, error


def plot(fit, compute, error, out, title, extrapolate, labels=("compute", "error")):
    """Draws the points and the fitted curves to `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    from keras_vitscale.scaling import plot_fit

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(compute, error, color="black", zorder=3, label="runs")
    plot_fit(ax, fit, compute, extrapolate)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    """Fits, prints and plots; returns the exit status (2: a bad CSV)."""
    args = build_parser().parse_args(argv)
    from keras_vitscale.scaling import fit_power_law

    try:
        compute, error = read_columns(args.csv, args.compute_column, args.error_column)
    except OSError as err:
        return common.fail(f"cannot read {args.csv}: {err.strerror}; give a CSV file.", PROG)
    except ValueError as err:
        return common.fail(str(err), PROG)
    try:
        fit = fit_power_law(compute, error, fit_shift=not args.no_shift)
    except ValueError as err:
        return common.fail(f"{args.csv}: {err}", PROG)
    print(fit)
    plot(fit, compute, error, args.out, args.title or args.csv, args.extrapolate,
         labels=(args.compute_column, args.error_column))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
