"""kvs-push-to-hub (`python tools/push_to_hub.py`): publish a keras_vitscale
preset to the Hugging Face Hub, with a model card.

A thin front over `keras_vitscale.hub.push_to_hub`. SOURCE is a preset
directory (written by `model.save_to_preset`) or a training workdir that
holds one exported preset directory; a workdir's config.json and
metrics.jsonl go into the model card. Log in first with `hf auth login` or
set HF_TOKEN.

Example:
    kvs-push-to-hub runs/digits my-org/vit-mu8-digits --safetensors
    kvs-push-to-hub presets_out/vit_b16 my-org/vit-b16 --revision v1 \\
        --message "ViT-B/16, 300 epochs"
"""

from keras_vitscale.cli import common

PROG = "kvs-push-to-hub"


def build_parser():
    """The upload tool's flags."""
    parser = common.parser(
        "push-to-hub", "Publish a keras_vitscale preset to the Hugging Face Hub, with a "
        "model card.",
        epilog="The upload is one commit: config.json, the weights, metadata.json, "
               "README.md (and model.safetensors). Load it back with "
               "kvs.ViT.from_preset('hf://ORG/REPO[@REVISION]').")
    parser.add_argument("source", metavar="PRESET_DIR_OR_WORKDIR",
                        help="a preset directory, or a training workdir holding one")
    parser.add_argument("repo_id", metavar="ORG/REPO", help="the Hub repo, created if missing")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its setting)")
    parser.add_argument("--revision", default=None,
                        help="branch to commit to, created from main if missing (default: main)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--safetensors", action="store_true",
                        help="also upload model.safetensors ({variable.path: array}) for "
                             "other frameworks")
    parser.add_argument("--workdir", default=None,
                        help="training workdir for the model card, when SOURCE is a "
                             "preset directory")
    parser.add_argument("--license", default="apache-2.0",
                        help="licence id for the model card (default: apache-2.0)")
    return parser


def main(argv=None):
    """Uploads; returns the exit status (2: a source that is not a preset)."""
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help answers without loading Keras.
    from keras_vitscale import ViT, hub

    # The flat safetensors file is written from a built model; the hub module
    # only moves files.
    try:
        model = (ViT.from_preset(hub.locate_preset(args.source)[0]) if args.safetensors
                 else None)
        commit = hub.push_to_hub(args.source, args.repo_id, private=args.private,
                                 revision=args.revision, commit_message=args.message,
                                 workdir=args.workdir, safetensors=args.safetensors,
                                 license=args.license, model=model)
    except (ValueError, FileNotFoundError) as err:
        return common.fail(str(err), PROG)
    print(f"Pushed {args.source} to {args.repo_id}: {commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
