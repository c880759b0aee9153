"""Convert a timm Vision Transformer into a keras_vitscale preset directory.

SOURCE is a timm model name (built with random weights, or with timm's
locally cached pretrained weights under --pretrained; nothing is downloaded)
or a .pth/.safetensors state dict. The preset (config.json,
model.weights.h5, metadata.json) loads with kvs.ViT.from_preset(PRESET_DIR).
When timm is installed the converted model is checked against the source on
random images and the largest logit difference is printed.

Example:
    python tools/convert.py --from timm vit_small_patch16_224 --to out/vit_s16
    python tools/convert.py --from timm vit_base_patch16_224.augreg_in21k \\
        --pretrained --to out/vit_b16_in21k
    python tools/convert.py --from timm ckpt.safetensors --num-heads 4 --to out/tiny
"""

import argparse
import importlib.util
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a timm VisionTransformer (model name or state-dict file) "
                    "into a keras_vitscale preset directory and check its logits.",
        epilog="Example: python tools/convert.py --from timm vit_small_patch16_224 "
               "--to out/vit_s16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="timm model name (e.g. vit_small_patch16_224) or a path to a "
                             ".pth/.pt/.bin/.safetensors state dict.")
    parser.add_argument("--from", dest="source_format", required=True, choices=["timm"],
                        help="library the source comes from.")
    parser.add_argument("--to", dest="preset_dir", required=True, metavar="PRESET_DIR",
                        help="output preset directory (created if needed).")
    parser.add_argument("--pretrained", action="store_true",
                        help="use timm's pretrained weights for a model name; they must "
                             "already be in the local cache (never downloads).")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, for a state dict whose shape does not tell "
                             "(no qk-norm, not a standard variant).")
    parser.add_argument("--image-size", default=None,
                        help="training resolution of a state dict with a non-square grid, "
                             "e.g. 224 or 192x320 (height x width).")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="0 drops the classifier; another count gets a fresh head "
                             "(default: the source's head).")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the logit comparison against timm.")
    parser.add_argument("--verify-batch", type=int, default=2,
                        help="random images in the comparison (default: 2).")
    return parser.parse_args(argv)


def _image_size(text):
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (1, 2):
        raise SystemExit(f"--image-size {text!r}: use 224 or HEIGHTxWIDTH such as 192x320.")
    return parts[0] if len(parts) == 1 else tuple(parts)


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("timm") is not None:
        # timm before Keras: under KERAS_BACKEND=tensorflow, loading timm's
        # triton after TensorFlow crashes the process.
        import timm  # noqa: F401
    # Imported after parsing so that --help answers without loading Keras.
    from keras_vitscale.convert import timm as timm_convert

    source = timm_convert.load_source(args.source, pretrained=args.pretrained)
    overrides = {}
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.image_size is not None:
        overrides["image_size"] = _image_size(args.image_size)
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    print(f"Copying weights from {args.source}:")
    model = timm_convert.from_timm(source, verbose=True, **overrides)
    weights = ("state-dict file" if not hasattr(source, "state_dict")
               else "timm pretrained" if args.pretrained else "random (not pretrained)")
    model.save_to_preset(args.preset_dir, metadata={
        "converted_from": f"timm:{args.source}", "source_weights": weights})
    print(f"Wrote {args.preset_dir}: {model.count_params():,} parameters, "
          f"{model.config.width}x{model.config.depth}, heads {model.config.num_heads}, "
          f"image {model.config.image_size}, pooling {model.config.pooling!r}.")

    if args.no_verify:
        return 0
    if importlib.util.find_spec("timm") is None:
        print("timm is not installed; skipped the logit check.")
        return 0
    if model.config.num_classes not in (0, timm_convert.source_num_classes(source)):
        print("The model has a fresh head (--num-classes); skipped the logit check.")
        return 0
    diff = timm_convert.verify(model, source, batch_size=args.verify_batch)
    what = "feature" if model.config.num_classes == 0 else "logit"
    print(f"max |{what} difference| vs timm: {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
