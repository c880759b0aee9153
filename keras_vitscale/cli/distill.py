"""kvs-distill (`python tools/distill.py`): distil a trained ViT (the
teacher) into another ViT (the student).

    kvs-pretrain --workdir runs/digits                  # a teacher
    kvs-distill --teacher runs/digits --student mu/8 --width 32 \\
        --depth 2 --workdir runs/digits_distilled
    kvs-distill --teacher path/to/preset --student S/16 --recipe scaling_vit \\
        --dataset tfds:imagenet2012 --image-size 224 --batch-size 4096 --steps 90000 \\
        --mesh data:8 --temperature 1 --workdir runs/s16_distilled

Every pretraining flag works as in kvs-pretrain: the same data pipeline,
distribution, checkpoints and resumption, outputs and exit status. The
student is trained on the teacher's softened logits; see the distillation
section of `--help`.
"""

import os

from keras_vitscale.cli import common
from keras_vitscale.cli import pretrain
from keras_vitscale.training import settings as settings_lib

DEFAULT_WORKDIR = os.path.join("runs", "digits_distilled")
DESCRIPTION = ("Distil a trained Vision Transformer (--teacher) into a student "
               "(--student VARIANT, or the pretraining default model) with "
               "keras_vitscale, around model.fit, with every pretraining flag.")
EPILOG = """\
the distillation loss:
  loss = (1 - w) * T^2 * KL(teacher_T || student_T) + w * label loss
  where teacher_T and student_T are the class distributions at temperature T
  (softmax of logits / T), w is --label-weight and the label loss is the run's
  --loss (with its --label-smoothing).
  With --loss sigmoid, the KL is between per-class Bernoulli distributions,
  summed over classes (the teacher's logits read as the sigmoid loss trains them).
  Defaults T = 1, w = 0: pure function matching (Beyer et al. 2022, "Knowledge
  distillation: a good teacher is patient and consistent"); the teacher sees the
  very same augmented images as the student (benchmarks/RESULTS.md has digits runs).

  The teacher is frozen (inference mode, not in the optimizer, never checkpointed)
  and must predict the data's number of classes; a mismatch stops the run before
  training. A teacher trained at another image size gets each batch resized
  (bilinear) to its own size; the student is built at --image-size. Checkpoints,
  WORKDIR/model and the few-shot table are the student's; loss and val_loss are
  the distillation loss, accuracy and val_accuracy the student's on the labels.

""" + pretrain.EPILOG



def build_parser():
    """kvs-pretrain's flags plus the distillation flags."""
    p = pretrain.build_parser("distill", DESCRIPTION, EPILOG, DEFAULT_WORKDIR)
    b = settings_lib.BASE
    d = p.add_argument_group("distillation")
    d.add_argument("--teacher", required=True, metavar="PRESET_OR_WORKDIR",
                   help="the trained teacher: a kvs-pretrain workdir (its "
                   "WORKDIR/model), a preset directory, hf://org/repo, or a built-in "
                   "preset name with published weights")
    d.add_argument("--student", metavar="VARIANT",
                   help="the student's variant, e.g. 'S/16' or 'mu/8' (same as --variant; "
                   "--width, --depth, ... override it)")
    d.add_argument("--temperature", type=float, dest="distill_temperature", metavar="T",
                   help=f"distillation temperature T > 0 (default {b['distill_temperature']})")
    d.add_argument("--label-weight", type=float, dest="distill_label_weight", metavar="W",
                   help="weight w in [0, 1] of the label loss mixed in (default "
                   f"{b['distill_label_weight']}: the teacher alone)")
    return p


def main(argv=None):
    """Runs a distillation (or a branch of one); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.student is not None and args.variant is not None:
        return common.fail(f"--student {args.student} and --variant {args.variant} both "
                           "set the student's variant; pass only --student.")
    if args.dataset is None:
        # a kvs-pretrain teacher workdir's own data (the default run's digits
        # 0-5), else all ten digits
        args.dataset = common.workdir_setting(args.teacher, "dataset") or "digits"
    if args.student is not None:
        args.variant = args.student
    del args.student
    from keras_vitscale.training import branch, distill

    # A branch of a distillation run distils from its parent's teacher.
    entry = branch.train if args.branch_from else distill.train
    return pretrain.main(args=args, default_workdir=DEFAULT_WORKDIR, entry=entry)


if __name__ == "__main__":
    raise SystemExit(main())
