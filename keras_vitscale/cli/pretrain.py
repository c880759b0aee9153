"""kvs-pretrain (`python tools/pretrain.py`): pretrain a ViT. With no flags:
a small ViT pretrained on the bundled digits 0-5, judged by few-shot transfer
to the digits 6-9 it never saw.

    kvs-pretrain                                     # digits 0-5 -> 6-9, < 5 min on a CPU
    kvs-pretrain --recipe scaling_vit --variant S/16 \\
        --dataset tfds:imagenet2012 --data-dir ~/tensorflow_datasets \\
        --image-size 224 --batch-size 4096 --steps 90000 --mesh data:8 \\
        --workdir runs/s16

Restarting the same command on the same --workdir resumes from the newest
valid checkpoint. See `--help` for every flag.
"""

import argparse
import os

from keras_vitscale.cli import common
from keras_vitscale.training import settings as settings_lib

DEFAULT_WORKDIR = os.path.join("runs", "digits")
DESCRIPTION = ("Pretrain a Vision Transformer with keras_vitscale (around model.fit). "
               "With no flags, trains the embedded default: a small ViT on the "
               "bundled scikit-learn digits 0-5 (upsampled to 32x32 RGB), reports "
               "their held-out accuracy and a 1/5/10-shot table on the digits 6-9 "
               "(classes the model never saw).")
EPILOG = """\
outputs in --workdir:
  config.json     every resolved setting and the model's ViTConfig (enough to rerun)
  metrics.jsonl   one JSON per logged step: step, loss, accuracy, learning_rate,
                  images_per_s, and val_loss / val_accuracy at evaluation steps
  checkpoints/    ckpt_<step>/ (model + optimizer state, step, data position, RNG),
                  written atomically every --checkpoint-every steps, last K kept
  model/          the final model as a preset (kvs.ViT.from_preset("WORKDIR/model"))
  curves.png      loss, accuracy and learning rate against steps
  fewshot.json    mean few-shot accuracy per shot and the source it is on
                  ("dataset": the --fewshot-dataset), when --fewshot is on
  tensorboard/    TensorBoard logs (with --tensorboard)

recipes (explicit flags override them):
  default      small ViT (width 64, depth 4, patch 8) on digits 0-5 at 32x32: Adam, cosine,
               lr 2e-3, 600 steps of batch 64, softmax cross-entropy
  scaling_vit  Scaling ViT: ScalingAdafactor, wd 0.03 body / 3.0 head (kernels),
               rsqrt schedule with 1% warmup and 5% cooldown, MAP head, sigmoid
               cross-entropy (head bias -10 at >= 1000 classes, else -log(classes)),
               global clipnorm 1.0, lr 8e-4
  simplevit    Adam, cosine, RandAugment 10 + mixup 0.2, GAP head, sincos2d posemb
  tat          SimplEsT-ViT (block vanilla): label smoothing 0.1, dropout 0.1, Adam

backends: JAX (default here) supports --mesh (keras.distribution DataParallel, or
ModelParallel for data:N,model:M). TensorFlow (KERAS_BACKEND=tensorflow) is
data-parallel only: --mesh data:N is tf.distribute.MirroredStrategy over the N local
GPUs (N must equal the GPUs TensorFlow sees; without GPUs, over N logical CPU devices
set up in Python before TensorFlow starts, for tests); --tpu NAME, --tpu
grpc://HOST:8470 or --tpu local (on a TPU VM) is TPUStrategy over all the TPU's
cores, and an unreachable TPU is an error, not a hang (each connection step times
out after 30 s). With --tpu, --mesh may be left out or be data:<the TPU's replica
count>. Model and fsdp axes need JAX. torch trains on a single device.
Exit status: 0 done, 2 bad settings / incompatible workdir / no restorable
checkpoint, 3 non-finite loss (the step is named), 130 interrupted (Ctrl-C:
the message names the step reached and the last checkpoint; rerun to resume).
"""


def build_parser(tool="pretrain", description=DESCRIPTION, epilog=EPILOG,
                 default_workdir=DEFAULT_WORKDIR):
    """The pretraining flags; `cli.distill` adds its own to them.

    Args:
        tool: the console script's name after "kvs-".
        description: the text under the usage line.
        epilog: the text after the flags.
        default_workdir: the run directory of the digits default.
    """
    p = common.parser(tool, description, epilog)
    b = settings_lib.BASE
    m = p.add_argument_group("model")
    m.add_argument("--preset", help="a built-in preset (a bare name: its architecture, "
                   "trained from scratch; NAME.TAG: starts from that checkpoint), a preset "
                   "directory or hf://org/repo (a keras_vitscale preset or a timm checkpoint), "
                   "whose weights are the starting point; like --variant, its own model "
                   "replaces the default model's")
    m.add_argument("--variant", help=f"variant such as 'S/16' or 'mu/4' (default: "
                   f"{b['variant']} with width {b['width']}, depth {b['depth']}); "
                   f"{settings_lib.VARIANT_HELP}")
    m.add_argument("--width", type=int, help="override the variant's width")
    m.add_argument("--depth", type=int, help="override the variant's depth")
    m.add_argument("--mlp-dim", type=int, help="override the variant's MLP size")
    m.add_argument("--num-heads", type=int, help="override the variant's heads")
    m.add_argument("--patch-size", type=int, help="override the variant's patch size")
    m.add_argument("--pooling", choices=("tok", "gap", "map"), help=f"classifier pooling (default {b['pooling']})")
    m.add_argument("--posemb", choices=("learn", "sincos2d", "none"),
                   help=f"position embedding (default {b['posemb']})")
    m.add_argument("--block", choices=("sequential", "parallel", "vanilla"),
                   help="block layout: pre-LN sequential, parallel attention and MLP, or "
                   f"SimplEsT's vanilla (default {b['block']})")
    m.add_argument("--dropout", type=float, help=f"dropout rate (default {b['dropout']})")
    m.add_argument("--num-classes", type=int,
                   help="classes (synthetic data; must match other datasets)")
    m.add_argument("--image-size", type=int, help=f"square input size (default {b['image_size']})")
    m.add_argument("--dtype-policy", help="e.g. float32 (default), mixed_bfloat16")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help=f"{b['dataset']} (default), digits (all ten), "
                   "digits:CLASSES (a class split: 'digits:6-9', 'digits:0,2,4'), "
                   "synthetic, folder:PATH, tfds:NAME[:SPLIT]")
    d.add_argument("--data-dir", help="TFDS data directory (never downloads)")
    d.add_argument("--batch-size", type=int, help=f"global batch (default {b['batch_size']})")
    d.add_argument("--augment", help="Keras augmentation spec, e.g. "
                   "'randaugment:10,mixup:0.2' or 'cutmix:1.0'; 'none' (default)")
    d.add_argument("--train-crop", choices=("inception", "resize"),
                   help="default: inception for natural images, resize for digits")
    d.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random left-right flips (default: on, off for digits)")
    d.add_argument("--label-smoothing", type=float, help="default 0")
    o = p.add_argument_group("optimisation")
    o.add_argument("--recipe", choices=tuple(settings_lib.RECIPES), help="defaults bundle "
                   "(see below); explicit flags override it")
    o.add_argument("--steps", type=int, help=f"training steps (default {b['steps']})")
    o.add_argument("--optimizer", choices=("adam", "adafactor", "shampoo"),
                   help="adam = kvs BF16Adam, adafactor = ScalingAdafactor "
                   f"(default {b['optimizer']})")
    o.add_argument("--lr", type=float, help=f"peak learning rate (default {b['lr']})")
    o.add_argument("--schedule", choices=("cosine", "rsqrt", "linear", "constant"),
                   help=f"learning-rate schedule (default {b['schedule']})")
    o.add_argument("--warmup-steps", type=int, help="default: recipe fraction of --steps")
    o.add_argument("--cooldown-steps", type=int, help="default: recipe fraction of --steps")
    o.add_argument("--rsqrt-timescale", type=int, help="rsqrt timescale (default 10000)")
    o.add_argument("--weight-decay", type=float, help="decoupled decay of kernels (x lr; "
                   f"default {b['weight_decay']})")
    o.add_argument("--head-weight-decay", type=float,
                   help="decay of head/kernel (default: same as --weight-decay)")
    o.add_argument("--clipnorm", type=float, help="global gradient-norm clip (0 = off; "
                   f"default {b['clipnorm']})")
    o.add_argument("--loss", choices=("softmax", "sigmoid"),
                   help=f"cross-entropy over softmax or per-class sigmoid (default {b['loss']})")
    br = p.add_argument_group(
        "cooldown branches", "continue a run on an rsqrt or constant schedule from one of "
        "its checkpoints with a linear cooldown to 0 over --cooldown-steps; the branch "
        "takes every other setting from the parent, which is never modified")
    br.add_argument("--branch-from", metavar="WORKDIR_OR_CHECKPOINT",
                    help="parent run directory (its newest checkpoint) or a "
                    "WORKDIR/checkpoints/ckpt_* directory")
    br.add_argument("--branch-step", type=int,
                    help="the parent checkpoint's step to branch from")
    r = p.add_argument_group("run")
    r.add_argument("--workdir", default=None, help=f"run directory (default {default_workdir} "
                   "for the digits default; required otherwise)")
    r.add_argument("--seed", type=int, help="seed of init, data order and "
                   f"augmentation (default {b['seed']})")
    r.add_argument("--checkpoint-every", type=int, help="steps between checkpoints "
                   f"(default {b['checkpoint_every']})")
    r.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept "
                   f"(default {b['keep_checkpoints']})")
    r.add_argument("--eval-every", type=int, help="steps between held-out "
                   f"evaluations (default {b['eval_every']})")
    r.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines "
                   f"(default {b['log_every']})")
    r.add_argument("--mesh", help="'data:N' (JAX, or TensorFlow MirroredStrategy); "
                   "'fsdp:N', 'data:N,model:M', 'fsdp:N,model:M' (JAX only); default: "
                   "one device")
    r.add_argument("--tpu", help="TensorFlow only: TPU name or grpc:// address for "
                   "tf.distribute.TPUStrategy ('local' for a TPU VM)")
    r.add_argument("--fewshot", help="few-shot shots at the end, e.g. "
                   "'1,5,10' (default for digits; 'none' elsewhere) or 'none'")
    r.add_argument("--fewshot-dataset", help="the downstream source of the few-shot "
                   "evaluation: examples from its train split, accuracy on its held-out "
                   "split (default: for a digits class split the other digits, e.g. "
                   "digits:6-9 for digits:0-5; otherwise the run's own dataset). A "
                   "digits split must not share only some classes with --dataset")
    r.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard logs to WORKDIR/tensorboard (Keras' callback)")
    r.add_argument("--wandb", nargs="?", const="keras_vitscale", metavar="PROJECT",
                   help="log to Weights & Biases (needs `pip install wandb`); "
                   "PROJECT defaults to keras_vitscale")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None, args=None, default_workdir=DEFAULT_WORKDIR, entry=None):
    """Runs a pretraining run (or a cooldown branch); returns the exit status
    (see EPILOG).

    Args:
        argv: the flags (default: sys.argv[1:]).
        args: already parsed flags (a superset of these), instead of argv:
            `cli.distill` passes its own.
        default_workdir: the run directory of the digits default.
        entry: the run's entry point, called as `entry(settings,
            progress=...)` (default: `trainer.train`, or `branch.train` with
            --branch-from).
    """
    args = build_parser().parse_args(argv) if args is None else args
    settings = common.run_settings(args)
    if settings["workdir"] is None:
        if settings["branch_from"]:
            return common.fail("--workdir is required with --branch-from: a branch writes "
                               "to a new directory and never modifies its parent.")
        if settings["dataset"] not in (None, "digits", settings_lib.BASE["dataset"]):
            return common.fail("--workdir is required for datasets other than digits.")
        settings["workdir"] = default_workdir

    from keras_vitscale.training import branch, trainer

    if entry is None:
        entry = branch.train if settings["branch_from"] else trainer.train
    summary, status = common.run_guarded(
        lambda: entry(settings, progress=not args.no_progress))
    if status is not None:
        return status
    acc = summary["val_accuracy"]
    dataset = settings["dataset"] or settings_lib.BASE["dataset"]
    print(f"\nstep {summary['step']}: held-out accuracy on {dataset} "
          f"{'n/a' if acc is None else f'{acc:.4f}'}, loss {summary['val_loss']}; "
          f"{summary['seconds']} s; outputs in {settings['workdir']}")
    if summary["fewshot"] is not None:
        print(f"few-shot linear evaluation on {summary['fewshot_dataset']} (ridge on "
              "pre-logits; its train split's examples, its held-out split's accuracy):")
        print(summary["fewshot"].table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
