"""kvs-finetune (`python tools/finetune.py`): fine-tune a pretrained ViT with
the Scaling ViT transfer recipe.

    kvs-finetune --from-workdir runs/digits --image-size 48 --workdir runs/ft48
    kvs-finetune --preset path/to/preset --dataset folder:/data/pets \\
        --image-size 384 --steps 2000 --batch-size 512 --lr 0.003 --workdir runs/pets
    kvs-finetune --from-workdir runs/digits --resize-patch 4 --workdir runs/flexi
    kvs-finetune --from-workdir runs/digits --linear-probe --workdir runs/probe

Recipe (Zhai et al. 2021): SGD with momentum 0.9, no weight decay, global
gradient-norm clip 1.0, cosine schedule with linear warmup, softmax
cross-entropy, a fresh zero-initialised head. A new --image-size resamples
the learned position embedding; --resize-patch PI-resizes the patch
embedding (FlexiViT) so a bilinearly upsampled patch gives the same token.

outputs in --workdir: model/ (the fine-tuned preset, kvs.ViT.from_preset(
"WORKDIR/model")) and metrics.jsonl (step, loss, accuracy, learning_rate;
val_loss and val_accuracy on the last line). Exit status: 0 done, 2 bad
settings, 3 non-finite loss, 130 interrupted (a fine-tuning run writes no
checkpoints: rerun to start again).
"""

import os

from keras_vitscale.cli import common


def build_parser():
    """The fine-tuning flags."""
    p = common.parser("finetune", __doc__.split("\n\n")[0].split(": ", 1)[1],
                      epilog=__doc__.split("\n\n", 1)[1])
    common.add_model_and_data(p, "--from-workdir")
    p.add_argument("--resample", choices=("linear", "bicubic"), default="linear",
                   help="position-embedding resampling to the new grid (default: linear, "
                        "as big_vision; bicubic as timm)")
    p.add_argument("--resize-patch", type=int, default=None,
                   help="new patch size, PI-resized from the pretrained one (FlexiViT); "
                        "must divide --image-size")
    p.add_argument("--linear-probe", action="store_true",
                   help="train only the head; every other weight stays frozen")
    p.add_argument("--steps", type=int, default=500, help="SGD steps (default: 500)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default: 0.01; "
                   "the paper sweeps 0.001-0.03)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps (default: 5%% of --steps)")
    p.add_argument("--workdir", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and crops")
    return p


def main(argv=None):
    """Fine-tunes; returns the exit status (see the epilog)."""
    args = build_parser().parse_args(argv)
    from keras_vitscale.training.finetune import finetune

    handle = args.preset or os.path.join(args.from_workdir, "model")
    summary, status = common.run_guarded(lambda: finetune(
        handle, args.workdir, dataset=args.dataset, data_dir=args.data_dir,
        image_size=args.image_size, resample=args.resample, resize_patch=args.resize_patch,
        linear_probe=args.linear_probe, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed), resumable=False)
    if status is not None:
        return status
    print(f"\nstep {summary['steps']}: held-out accuracy {summary['val_accuracy']:.4f}, "
          f"loss {summary['val_loss']:.4f}; {summary['seconds']} s; outputs in {args.workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
