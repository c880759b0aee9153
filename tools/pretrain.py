#!/usr/bin/env python
"""Pretrain a ViT. With no flags: a small ViT on the bundled digits data.

    python tools/pretrain.py                         # digits default, < 5 min on a CPU
    python tools/pretrain.py --recipe scaling_vit --variant S/16 \\
        --dataset tfds:imagenet2012 --data-dir ~/tensorflow_datasets \\
        --image-size 224 --batch-size 4096 --steps 90000 --mesh data:8 \\
        --workdir runs/s16

Restarting the same command on the same --workdir resumes from the newest
valid checkpoint. See `--help` for every flag.
"""

import os

# The JAX backend is the tool's default; an explicit KERAS_BACKEND wins.
os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import sys  # noqa: E402

from keras_vitscale.training import settings as settings_lib  # noqa: E402

EPILOG = """\
outputs in --workdir:
  config.json     every resolved setting and the model's ViTConfig (enough to rerun)
  metrics.jsonl   one JSON per logged step: step, loss, accuracy, learning_rate,
                  images_per_s, and val_loss / val_accuracy at evaluation steps
  checkpoints/    ckpt_<step>/ (model + optimizer state, step, data position, RNG),
                  written atomically every --checkpoint-every steps, last K kept
  model/          the final model as a preset (kvs.ViT.from_preset("WORKDIR/model"))
  curves.png      loss, accuracy and learning rate against steps
  fewshot.json    mean few-shot accuracy per shot (when --fewshot is on)
  tensorboard/    TensorBoard logs (with --tensorboard)

recipes (explicit flags override them):
  default      small ViT (width 64, depth 4, patch 8) on digits 32x32: Adam, cosine,
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
checkpoint, 3 non-finite loss (the step is named).
"""


def build_parser():
    """The pretraining flags (tools/distill.py extends them)."""
    p = argparse.ArgumentParser(
        description="Pretrain a Vision Transformer with keras_vitscale (around model.fit). "
                    "With no flags, trains the embedded default: a small ViT on the "
                    "bundled scikit-learn digits (upsampled to 32x32 RGB), reports "
                    "held-out accuracy and a 1/5/10-shot table.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b = settings_lib.BASE
    m = p.add_argument_group("model")
    m.add_argument("--preset", help="built-in preset name or preset directory "
                   "(a directory's weights are the starting point); like --variant, its "
                   "own model replaces the default model's")
    m.add_argument("--variant", help=f"variant such as 'S/16' or 'mu/4' (default: "
                   f"{b['variant']} with width {b['width']}, depth {b['depth']}); "
                   f"{settings_lib.VARIANT_HELP}")
    m.add_argument("--width", type=int, help="override the variant's width")
    m.add_argument("--depth", type=int, help="override the variant's depth")
    m.add_argument("--mlp-dim", type=int, help="override the variant's MLP size")
    m.add_argument("--num-heads", type=int, help="override the variant's heads")
    m.add_argument("--patch-size", type=int, help="override the variant's patch size")
    m.add_argument("--pooling", choices=("tok", "gap", "map"), help="classifier pooling")
    m.add_argument("--posemb", choices=("learn", "sincos2d", "none"))
    m.add_argument("--block", choices=("sequential", "parallel", "vanilla"))
    m.add_argument("--dropout", type=float, help="dropout rate")
    m.add_argument("--num-classes", type=int,
                   help="classes (synthetic data; must match other datasets)")
    m.add_argument("--image-size", type=int, help=f"square input size (default {b['image_size']})")
    m.add_argument("--dtype-policy", help="e.g. float32 (default), mixed_bfloat16")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="digits (default), synthetic, folder:PATH, "
                   "tfds:NAME[:SPLIT]")
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
                   help="adam = kvs BF16Adam, adafactor = ScalingAdafactor")
    o.add_argument("--lr", type=float, help=f"peak learning rate (default {b['lr']})")
    o.add_argument("--schedule", choices=("cosine", "rsqrt", "linear", "constant"))
    o.add_argument("--warmup-steps", type=int, help="default: recipe fraction of --steps")
    o.add_argument("--cooldown-steps", type=int, help="default: recipe fraction of --steps")
    o.add_argument("--rsqrt-timescale", type=int, help="rsqrt timescale (default 10000)")
    o.add_argument("--weight-decay", type=float, help="decoupled decay of kernels (x lr)")
    o.add_argument("--head-weight-decay", type=float,
                   help="decay of head/kernel (default: same as --weight-decay)")
    o.add_argument("--clipnorm", type=float, help="global gradient-norm clip (0 = off)")
    o.add_argument("--loss", choices=("softmax", "sigmoid"))
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
    r.add_argument("--workdir", default=None, help="run directory (default runs/digits "
                   "for the digits default; required otherwise)")
    r.add_argument("--seed", type=int, help="seed of init, data order and augmentation")
    r.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    r.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept")
    r.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    r.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines")
    r.add_argument("--mesh", help="'data:N' (JAX, or TensorFlow MirroredStrategy); "
                   "'fsdp:N', 'data:N,model:M', 'fsdp:N,model:M' (JAX only)")
    r.add_argument("--tpu", help="TensorFlow only: TPU name or grpc:// address for "
                   "tf.distribute.TPUStrategy ('local' for a TPU VM)")
    r.add_argument("--fewshot", help="few-shot shots on held-out data at the end, e.g. "
                   "'1,5,10' (default for digits; 'none' elsewhere) or 'none'")
    r.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard logs to WORKDIR/tensorboard (Keras' callback)")
    r.add_argument("--wandb", nargs="?", const="keras_vitscale", metavar="PROJECT",
                   help="log to Weights & Biases (needs `pip install wandb`); "
                   "PROJECT defaults to keras_vitscale")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def run_settings(args):
    """The parsed flags that define the run (config.json), without the ones that
    only say how this process runs."""
    return {k: v for k, v in vars(args).items() if k != "no_progress"}


def main(argv=None, args=None, default_workdir=os.path.join("runs", "digits"), entry=None):
    """Runs a pretraining run (or a cooldown branch); returns the exit status
    (see EPILOG).

    tools/distill.py reuses it with its own parsed `args` (a superset of
    these flags), its own default workdir and its entry point (`entry`,
    called as `entry(settings, progress=...)`).
    """
    args = parse_args(argv) if args is None else args
    settings = run_settings(args)
    if settings["workdir"] is None:
        if settings["branch_from"]:
            print("ERROR: --workdir is required with --branch-from: a branch writes to a "
                  "new directory and never modifies its parent.", file=sys.stderr)
            return 2
        if settings["dataset"] not in (None, "digits"):
            print("ERROR: --workdir is required for datasets other than digits.",
                  file=sys.stderr)
            return 2
        settings["workdir"] = default_workdir

    from keras_vitscale.training import TrainingError
    from keras_vitscale.training import branch, trainer
    from keras_vitscale.training.errors import report

    if entry is None:
        entry = branch.train if settings["branch_from"] else trainer.train
    try:
        summary = entry(settings, progress=not args.no_progress)
    except (ValueError, TrainingError) as err:
        return report(err)
    acc = summary["val_accuracy"]
    print(f"\nstep {summary['step']}: held-out accuracy "
          f"{'n/a' if acc is None else f'{acc:.4f}'}, loss {summary['val_loss']}; "
          f"{summary['seconds']} s; outputs in {settings['workdir']}")
    if summary["fewshot"] is not None:
        print("few-shot linear evaluation (ridge on pre-logits, held-out test):")
        print(summary["fewshot"].table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
