"""Preset directories: config.json, model.weights.h5 and metadata.json.

A preset directory holds `config.json`, `model.weights.h5` (or
`model.weights.json` plus shards) and `metadata.json`, with keras-hub's file
names. Reading never imports or executes anything named in a file: the
config must name `ViT` of this library, and its fields are checked against
`ViTConfig`. Writing takes the model as an argument (anything with
`config`, `weights` and `save_weights`), so this module needs no model class.
"""

import datetime
import json
from pathlib import Path

import numpy as np

from keras_vitscale.config import ViTConfig
from keras_vitscale.presets.registry import ALIASES, REGISTRY

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
DEFAULT_MAX_SHARD_GB = 5.0


def _unknown_preset_error(handle):
    return ValueError(
        f"Unknown preset {handle!r}. Built-in presets: {', '.join(sorted(REGISTRY))}"
        f" (aliases: {ALIASES}); or pass a preset directory (with {CONFIG_FILE}) "
        "or a Hugging Face handle 'hf://org/repo'.")


def resolve_directory(handle):
    """The local preset directory `handle` names; a clear error otherwise.

    Only local paths: a "hf://org/repo" handle is the Hub's to download
    (`keras_vitscale.pretrained.resolve_directory` takes every kind of handle).

    Example:
    ```python
    resolve_directory("~/presets/vit_mu8")   # Path('/home/me/presets/vit_mu8')
    ```
    """
    handle = str(handle)
    if handle.startswith("hf://"):
        raise ValueError(
            f"{handle!r} is a Hugging Face handle, not a local directory; resolve it "
            "with keras_vitscale.pretrained.resolve_directory (ViT.from_preset does).")
    path = Path(handle).expanduser()
    if path.is_dir():
        return path
    raise _unknown_preset_error(handle)


def read_directory_config(directory):
    """Reads and checks config.json of a preset directory; returns ViTConfig.

    Example:
    ```python
    read_directory_config("out/vit_mu8").width
    ```
    """
    directory = Path(directory)
    missing = [name for name in (CONFIG_FILE, METADATA_FILE) if not (directory / name).exists()]
    if not (directory / WEIGHTS_FILE).exists() and not (directory / SHARDED_WEIGHTS_FILE).exists():
        missing.append(f"{WEIGHTS_FILE} (or {SHARDED_WEIGHTS_FILE})")
    if missing:
        raise FileNotFoundError(
            f"Preset directory {str(directory)!r} is missing {missing}; a preset "
            f"directory needs {CONFIG_FILE}, {METADATA_FILE} and the weights, as "
            "written by model.save_to_preset(directory).")
    return read_config_file(directory / CONFIG_FILE)


def read_config_file(path):
    """Reads and checks a preset's config.json on its own; returns ViTConfig.

    The Hub loader calls this before downloading any weights.
    """
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    module, class_name = data.get("module"), data.get("class_name")
    # Refuse rather than import: a config naming another class could make a
    # loader execute code from the download.
    if module != "keras_vitscale" or class_name != "ViT":
        raise ValueError(
            f"{path} names class {module}.{class_name}; only "
            "keras_vitscale.ViT presets are loaded (nothing named in a downloaded "
            "file is ever imported or executed).")
    if not isinstance(data.get("config"), dict):
        raise ValueError(f"{path} has no 'config' object.")
    return ViTConfig.from_dict(data["config"])


def weights_path(directory):
    """The weights file of a preset directory: the shard index if sharded."""
    directory = Path(directory)
    sharded = directory / SHARDED_WEIGHTS_FILE
    return sharded if sharded.exists() else directory / WEIGHTS_FILE


def write_directory(model, directory, max_shard_size_gb=None, metadata=None):
    """Writes a model as a preset directory; implements `ViT.save_to_preset`.

    Args:
        model: a `kvs.ViT` (anything with `config`, `weights` and
            `save_weights`).
        directory: the preset directory (created if needed).
        max_shard_size_gb: shard the weights above this size (default 5 GB).
        metadata: extra entries for metadata.json.

    Example:
    ```python
    write_directory(model, "out/vit_mu8", metadata={"dataset": "digits"})
    ```
    """
    import keras

    import keras_vitscale  # the package itself (for __version__), not a module of it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump({"module": "keras_vitscale", "class_name": "ViT",
                   "config": config.to_dict()}, f, indent=2)
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                       for v in model.weights)
    limit = DEFAULT_MAX_SHARD_GB if max_shard_size_gb is None else max_shard_size_gb
    stale = [directory / WEIGHTS_FILE, directory / SHARDED_WEIGHTS_FILE,
             *directory.glob("model_*.weights.h5")]
    for path in stale:  # never leave an old format beside the new one
        if path.exists():
            path.unlink()
    if weight_bytes > limit * 1e9:
        model.save_weights(directory / SHARDED_WEIGHTS_FILE, max_shard_size=limit)
    else:
        model.save_weights(directory / WEIGHTS_FILE)
    info = {
        "keras_version": keras.version(),
        "keras_vitscale_version": keras_vitscale.__version__,
        "parameter_count": config.count_params(),
        "gflops": round(config.flops_per_image() / 1e9, 2),
        "date_saved": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **(metadata or {}),
    }
    with open(directory / METADATA_FILE, "w") as f:
        json.dump(info, f, indent=2)


