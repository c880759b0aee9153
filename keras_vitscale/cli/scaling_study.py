"""kvs-scaling-study (`python tools/scaling_study.py`): a scaling study in
miniature: error against training compute for several ViT sizes, from one
long run per size and its cooldown branches.

    kvs-scaling-study --workdir runs/scaling_study      # the default
    kvs-scaling-study --variants mu,Ti,S --branch-steps 100,200,400,800 \\
        --dataset digits --workdir runs/study2

Rerunning the same command on the same --workdir resumes the study. See
`--help` for every flag.
"""

import argparse
import os

from keras_vitscale.cli import common
from keras_vitscale.training import study as study_lib
from keras_vitscale.training import study_report

D = study_lib.DEFAULTS
DEFAULT_STEPS = " ".join(f"{v}={','.join(map(str, s))}"
                         for v, s in study_lib.DEFAULT_BRANCH_STEPS.items())

DESCRIPTION = """\
For each variant: one long run on an rsqrt (or constant) schedule that keeps a
checkpoint at every branch step S, then one cooldown branch per S that
continues it and cools the learning rate linearly to 0 over the last
--cooldown-fraction of the branch (N = S f / (1 - f) steps; f = 0.2: a branch
at step 400 ends at 500). Each branch is a point: training FLOPs (3 x the
config's analytic forward FLOPs per image x images seen, (S + N) x batch),
held-out error and k-shot error. The compute-optimal frontier of each error
is fitted with E = a (C + d)^-b + c (plain E = a C^-b for contrast)."""

EPILOG = f"""\
the default study (under 20 minutes on a 2-core CPU, JAX):
  variants mu, Ti, S: their Table 2 widths, MLP sizes and heads, each at depth 2,
  on 32x32 digits with 8x8 patches, batch 64, Adam lr 1e-3, rsqrt schedule with
  warmup and timescale 5% of the longest branch step; branch steps
  {DEFAULT_STEPS}
  (the smallest model runs the most steps, so that the sizes' compute overlaps)

outputs in --workdir:
  study.json              the study's settings and plan; a rerun with other
                          settings is refused before any work
  runs/VARIANT/parent/    the long run (a kvs-pretrain workdir)
  runs/VARIANT/branch_S/  its branch at step S (zero-padded)
  study.csv               one row per branch: variant, params, forward FLOPs per
                          image, branch step, cooldown, steps, images seen,
                          training FLOPs, held-out error, k-shot error
  fit.json                fitted a, b, c, d with standard errors, per error
  study.png               error against training FLOPs, log-log: points per
                          variant, the fitted frontier, the plain power law

resuming: rerun the same command; unfinished runs continue from their newest
checkpoint, finished branches are read from their workdirs, not rerun.
exit status: 0 done, 2 bad settings or a workdir holding something else,
3 non-finite loss (the run and step are named), 130 interrupted (rerun to resume).
"""


def _depth(text):
    if text == "variant":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an integer or 'variant'") from None


def build_parser():
    """The study's flags."""
    p = common.parser("scaling-study", DESCRIPTION, EPILOG)
    p.add_argument("--workdir", default=os.path.join("runs", "scaling_study"),
                   help="the study's directory (default: runs/scaling_study)")
    p.add_argument("--variants", help=f"comma-separated variant names "
                   f"(default: {','.join(D['variants'])}); see kvs.config.VARIANTS")
    p.add_argument("--branch-steps", nargs="+", metavar="STEPS",
                   help="branch steps: one list for every variant ('100,200,400,800') or "
                   "one VARIANT=list per variant ('mu=400,800 Ti=40,80'); the parent runs "
                   "to the largest. Default: the defaults of mu, Ti and S above")
    p.add_argument("--depth", type=_depth, help=f"blocks of every variant (default "
                   f"{D['depth']}), or 'variant' for each variant's own depth")
    p.add_argument("--patch-size", type=int, help=f"patch size (default {D['patch_size']})")
    p.add_argument("--image-size", type=int, help=f"square input size (default "
                   f"{D['image_size']})")
    p.add_argument("--dataset", help="digits (default), synthetic, folder:PATH or "
                   "tfds:NAME[:SPLIT]")
    p.add_argument("--data-dir", help="TFDS data directory (nothing is downloaded)")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {D['batch_size']})")
    p.add_argument("--optimizer", choices=("adam", "adafactor", "shampoo"),
                   help=f"optimizer (default {D['optimizer']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {D['lr']})")
    p.add_argument("--schedule", choices=study_lib.SCHEDULES,
                   help=f"the parents' schedule (default {D['schedule']})")
    p.add_argument("--warmup-fraction", type=float, help="warmup (and rsqrt timescale) as "
                   "a fraction of the longest branch step, at most the first branch step "
                   f"(default {D['warmup_fraction']})")
    p.add_argument("--cooldown-fraction", type=float, help="fraction of each branch spent "
                   f"cooling down (default {D['cooldown_fraction']})")
    p.add_argument("--shots", type=int, help=f"k of the k-shot error (default {D['shots']})")
    p.add_argument("--seed", type=int, help=f"seed of every run (default {D['seed']})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv=None):
    """Runs the study; returns the exit status (see the epilog)."""
    args = build_parser().parse_args(argv)
    settings = common.run_settings(args)
    if settings["branch_steps"] is not None:
        settings["branch_steps"] = " ".join(settings["branch_steps"])
    result, status = common.run_guarded(
        lambda: study_lib.run(settings, progress=not args.no_progress))
    if status is not None:
        return status
    shots = result["settings"]["shots"]
    print("\n" + study_report.format_table(result["rows"], shots))
    print("\n" + study_report.format_fits(result["fits"]))
    workdir = result["workdir"]
    print(f"\n{result['trained']} run(s) trained in {result['seconds']} s; wrote "
          f"{workdir / 'study.csv'}, {workdir / 'fit.json'} and {workdir / 'study.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
