"""kvs-convert (`python tools/convert.py`): convert a timm, big_vision or
transformers ViT into a keras_vitscale preset.

SOURCE depends on --from:
  timm          a timm model name (timm's random initialisation, or its locally
                cached pretrained weights with --pretrained; nothing is
                downloaded) or
                a .pth/.safetensors state dict (--num-heads when the shapes
                do not tell);
  big_vision    a .npz checkpoint, optionally "ckpt.npz:sub/tree" for one
                tower of a larger file (--variant checks the shapes);
  transformers  a directory written by save_pretrained (ViTForImageClassification
                or ViTModel; --use-pooler keeps ViTModel's pooler).
The preset (config.json, model.weights.h5, metadata.json) loads with
kvs.ViT.from_preset(PRESET_DIR). When the source framework is installed the
converted model is run against it on random images and the largest logit
(or feature) difference is printed. --push then uploads the preset.

Example:
    kvs-convert --from timm vit_small_patch16_224 --to out/vit_s16
    kvs-convert --from big_vision vit_b16.npz --variant B/16 --to out/b16
    kvs-convert --from big_vision siglip.npz:params/img --num-classes 0 \\
        --to out/siglip_tower
    kvs-convert --from transformers saved_vit/ --to out/hf_vit --push org/vit
"""

import importlib.util

from keras_vitscale.cli import common

PROG = "kvs-convert"

# Options that only one or two source formats take.
ONLY_FOR = {"pretrained": ("timm",), "num_heads": ("timm",),
            "variant": ("big_vision", "transformers"), "use_pooler": ("transformers",)}


def build_parser():
    """The converter's flags."""
    parser = common.parser(
        "convert", "Convert a timm, big_vision or transformers Vision Transformer into "
        "a keras_vitscale preset directory and check its logits.",
        epilog=__doc__[__doc__.index("Example:"):])
    parser.add_argument("source", metavar="SOURCE",
                        help="timm: model name or state-dict file; big_vision: "
                             "ckpt.npz[:sub/tree]; transformers: saved directory.")
    parser.add_argument("--from", dest="source_format", required=True,
                        choices=["timm", "big_vision", "transformers"],
                        help="library the source comes from.")
    parser.add_argument("--to", dest="preset_dir", required=True, metavar="PRESET_DIR",
                        help="output preset directory (created if needed).")
    parser.add_argument("--push", metavar="ORG/REPO", default=None,
                        help="upload the preset to this Hugging Face Hub repo afterwards.")
    parser.add_argument("--pretrained", action="store_true",
                        help="timm: use timm's pretrained weights for a model name; they "
                             "must already be in the local cache (never downloads).")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="timm: attention heads, for a state dict whose shapes do not "
                             "tell (no qk-norm, not a standard variant).")
    parser.add_argument("--variant", default=None,
                        help="big_vision/transformers: e.g. B/16; the checkpoint's shapes "
                             "must match it (default: read them from the checkpoint).")
    parser.add_argument("--use-pooler", action="store_true",
                        help="transformers: keep ViTModel's tanh pooler as pre_logits, so "
                             "the features are pooler_output.")
    parser.add_argument("--image-size", default=None,
                        help="training resolution when the checkpoint does not record it "
                             "(non-square grid, fixed sincos posemb), e.g. 224 or 192x320.")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="0 drops the classifier; another count gets a fresh head "
                             "(default: the source's head).")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the comparison against the source framework.")
    parser.add_argument("--verify-batch", type=int, default=2,
                        help="random images in the comparison (default: 2).")
    return parser


def parse_args(argv=None):
    """The parsed flags; a flag of another source format is a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, formats in ONLY_FOR.items():
        if getattr(args, option) not in (None, False) and args.source_format not in formats:
            parser.error(f"--{option.replace('_', '-')} applies to --from "
                         f"{' or '.join(formats)}, not --from {args.source_format}.")
    return args


def _image_size(text):
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ValueError(f"--image-size {text!r}: use 224 or HEIGHTxWIDTH such as 192x320.")
    return parts[0] if len(parts) == 1 else tuple(parts)


def convert(args, overrides):
    """(model, metadata, timm source or None); says where the weights come from."""
    from keras_vitscale import convert as kvs_convert
    from keras_vitscale.convert import files

    what = f"{args.source_format}:{args.source}"
    metadata = {"converted_from": what}
    if args.source_format == "timm":
        source = files.load_timm_source(args.source, pretrained=args.pretrained)
        random = hasattr(source, "state_dict") and not args.pretrained
        # A model name without --pretrained is timm's random initialisation.
        print(f"Copying weights from {what}"
              + (": random weights (pass --pretrained for the checkpoint)" if random else ":"))
        if args.num_heads is not None:
            overrides["num_heads"] = args.num_heads
        model = kvs_convert.from_timm(source, verbose=True, **overrides)
        metadata["source_weights"] = (
            "state-dict file" if not hasattr(source, "state_dict")
            else "timm pretrained" if args.pretrained else "random (not pretrained)")
        return model, metadata, source
    print(f"Copying weights from {what}:")
    if args.source_format == "big_vision":
        model = kvs_convert.from_big_vision(args.source, variant=args.variant, verbose=True,
                                            **overrides)
        return model, metadata, None
    model = kvs_convert.from_transformers(args.source, variant=args.variant,
                                          use_pooler=args.use_pooler, verbose=True,
                                          **overrides)
    return model, metadata, None


def verify(args, model, timm_source):
    """The max |difference| vs the source framework, or a sentence saying why not."""
    framework = "timm" if args.source_format != "transformers" else "transformers"
    if importlib.util.find_spec(framework) is None:
        return f"skipped: {framework} is not installed"
    from keras_vitscale.convert import verify as check

    try:
        if args.source_format == "timm":
            return check.verify_timm(model, timm_source, batch_size=args.verify_batch)
        if args.source_format == "big_vision":
            return check.verify_big_vision(model, args.source, batch_size=args.verify_batch)
        return check.verify_transformers(model, args.source, use_pooler=args.use_pooler,
                                         batch_size=args.verify_batch)
    except ValueError as error:  # a fresh head, or no timm equivalent: nothing to compare
        return f"skipped: {error}"


def main(argv=None):
    """Converts, verifies and optionally pushes; returns the exit status
    (2: a source that cannot be converted)."""
    args = parse_args(argv)
    if importlib.util.find_spec("timm") is not None:
        # timm before Keras: under KERAS_BACKEND=tensorflow, loading timm's
        # triton (also pulled in by transformers) after TensorFlow crashes.
        import timm  # noqa: F401
    # Imported after parsing so that --help answers without loading Keras.
    import keras_vitscale as kvs

    overrides = {}
    try:
        if args.image_size is not None:
            overrides["image_size"] = _image_size(args.image_size)
        if args.num_classes is not None:
            overrides["num_classes"] = args.num_classes
        model, metadata, timm_source = convert(args, overrides)
    except (FileNotFoundError, ValueError) as error:
        # The converters' messages name the problem and the fix; no traceback.
        return common.fail(f"cannot convert {args.source!r}: {error}", PROG)
    model.save_to_preset(args.preset_dir, metadata=metadata)
    c = model.config
    print(f"Wrote {args.preset_dir}: {model.count_params():,} parameters, "
          f"{c.width}x{c.depth}, heads {c.num_heads}, block {c.block!r}, "
          f"image {c.image_size}, pooling {c.pooling!r}.")

    if not args.no_verify:
        result = verify(args, model, timm_source)
        what = "feature" if c.num_classes == 0 else "logit"
        reference = {"timm": "timm", "big_vision": "timm's npz reader",
                     "transformers": "transformers"}[args.source_format]
        print(result if isinstance(result, str)
              else f"max |{what} difference| vs {reference}: {result:.3g}")
    if args.push:
        commit = kvs.hub.push_to_hub(args.preset_dir, args.push)
        print(f"Pushed {args.preset_dir} to {args.push}: {commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
