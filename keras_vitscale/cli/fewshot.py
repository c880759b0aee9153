"""kvs-fewshot (`python tools/fewshot.py`): few-shot linear evaluation of a
trained ViT's features (big_vision's evaluator).

    kvs-fewshot --workdir runs/digits --dataset digits:6-9
    kvs-fewshot --preset path/to/preset --dataset folder:/data/pets \\
        --image-size 224 --shots 1,5,10,25 --l2-reg auto

Features are the pre-logits representation; the few-shot examples come from
the downstream dataset's training split and the accuracy from its held-out
split. Without --dataset: the workdir's --fewshot-dataset (digits:6-9 for the
default run), or digits.
Exit status: 0 done, 2 bad settings (a missing model, bad shots).
"""

import os

from keras_vitscale.cli import common


def build_parser():
    """The few-shot evaluation flags."""
    p = common.parser("fewshot", __doc__.split("\n\n")[0].split(": ", 1)[1],
                      epilog=__doc__.split("\n\n", 1)[1])
    common.add_model_and_data(p, "--workdir")
    p.set_defaults(dataset=None)
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated shots (default: 1,5,10,25)")
    p.add_argument("--seeds", type=int, default=3, help="sampling seeds per shot (default: 3)")
    p.add_argument("--l2-reg", default=str(2**10),
                   help="ridge lambda, or 'auto' to pick it by leave-one-out (default: 1024)")
    return p


def main(argv=None):
    """Prints the few-shot table; returns the exit status (see the epilog)."""
    args = build_parser().parse_args(argv)
    from keras_vitscale import data
    from keras_vitscale.evaluation.on_source import check_shots
    from keras_vitscale.evaluation.on_source import fewshot_on_source
    from keras_vitscale.model import ViT

    if args.workdir is not None and not os.path.isdir(os.path.join(args.workdir, "model")):
        return common.fail(f"--workdir {args.workdir} has no final model ({args.workdir}/model "
                           "is missing): give a finished kvs-pretrain workdir, or --preset.")
    if args.dataset is None:
        args.dataset = common.workdir_setting(args.workdir, "fewshot_dataset") or "digits"
    try:
        shots = check_shots(args.shots)
        l2_reg = args.l2_reg if args.l2_reg == "auto" else float(args.l2_reg)
        handle = args.preset or os.path.join(args.workdir, "model")
        model = ViT.from_preset(handle, image_size=args.image_size)
        size = model.config.image_size
        source = data.load_source(args.dataset, data_dir=args.data_dir, image_size=size)
    except (ValueError, FileNotFoundError) as err:
        return common.fail(err)
    result = fewshot_on_source(model, source, size, shots=shots, seeds=args.seeds,
                               l2_reg=l2_reg, progress=True)
    print(f"few-shot on {args.dataset}:")
    print(result.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
