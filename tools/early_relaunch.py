"""Relaunch a training tool with the retaining host malloc before it imports Keras.

Not a tool: the training tools (pretrain, distill, finetune, scaling_study)
call `relaunch_if_wanted()` first thing. Importing keras_vitscale takes about
8 s on a 2-core CPU (Keras, JAX, TensorFlow's tf.data), and a relaunch after
that import would pay it twice: a sixth of the digits default run's minute.

So this module reads only --host-malloc and --tpu from the command line, and
loads keras_vitscale/training/host_memory.py (standard library only) from
its file without running the package's __init__. The tool's own parser still
defines, documents and validates both flags.
"""

import argparse
import importlib.util
import sys
from pathlib import Path


def _load_host_memory():
    package = importlib.util.find_spec("keras_vitscale")  # finds; does not import
    if package is None or package.origin is None:
        raise SystemExit("ERROR: keras_vitscale is not installed; run `make pretrain` or "
                         "`pip install -e .` from the repository root.")
    path = Path(package.origin).parent / "training" / "host_memory.py"
    spec = importlib.util.spec_from_file_location("_early_host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relaunch_if_wanted(argv=None):
    """Restarts this process with the retaining malloc when --host-malloc asks.

    Args:
        argv: the command-line arguments (default: sys.argv[1:]). Only
            --host-malloc (default "auto") and --tpu are read; `--help`
            never relaunches.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host-malloc", default="auto")
    parser.add_argument("--tpu")
    args, _ = parser.parse_known_args(argv)
    _load_host_memory().relaunch_if_wanted(args.host_malloc, args.tpu)


if __name__ == "__main__":
    print(__doc__)  # a helper of the tools, not a tool: it only describes itself
