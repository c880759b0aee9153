"""Presets: the built-in registry, preset directories and weight loading.

A preset is data, not code. A built-in preset is `presets/NAME.json` (config,
metadata, weights handle or null). A preset directory holds `config.json`,
`model.weights.h5` (or `model.weights.json` plus shards) and
`metadata.json`, with keras-hub's file names. Loading never imports or
executes anything named in a file: the config must name `ViT` of this
library, and its fields are checked against `ViTConfig`.
"""

import collections.abc
import datetime
import json
import logging
import os
from pathlib import Path

import numpy as np

from keras_vitscale.config import ViTConfig

logger = logging.getLogger("keras_vitscale")

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
DEFAULT_MAX_SHARD_GB = 5.0

# Case-insensitive file systems cannot hold vit_g14.json and vit_G14.json
# side by side, so ViT-G/14 lives in vit_bigG14.json (OpenCLIP's name).
ALIASES = {"vit_G14": "vit_bigG14"}

_warned_no_weights = set()


def builtin_dir():
    """Where the built-in JSON files are: inside the wheel, or the repo."""
    packaged = Path(__file__).parent / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "presets"


def _read_builtin():
    table = {}
    for path in sorted(builtin_dir().glob("*.json")):
        with open(path) as f:
            table[path.stem] = json.load(f)
    return table


class PresetRegistry(collections.abc.Mapping):
    """Read-only mapping: preset name -> its JSON (config, metadata, weights).

    Example:
    ```python
    sorted(kvs.ViT.presets)             # ['simplest_vit_s16', ..., 'vit_ti16']
    kvs.ViT.presets["vit_g14"]["metadata"]["params"]
    ```
    """

    def __init__(self):
        self._table = None

    def _data(self):
        if self._table is None:
            self._table = _read_builtin()
        return self._table

    def __getitem__(self, name):
        return self._data()[ALIASES.get(name, name)]

    def __contains__(self, name):
        return ALIASES.get(name, name) in self._data()

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())

    def __repr__(self):
        return f"PresetRegistry({sorted(self._data())})"


REGISTRY = PresetRegistry()


def builtin_config(name, **overrides):
    """The `ViTConfig` of a built-in preset, with overrides applied."""
    entry = REGISTRY[name]
    fields = dict(entry["config"])
    variant = fields.pop("variant", None)
    fields.update(overrides)
    if variant is None:
        return ViTConfig(**fields)
    return ViTConfig.from_variant(variant, **fields)


def _unknown_preset_error(handle):
    return ValueError(
        f"Unknown preset {handle!r}. Built-in presets: {', '.join(sorted(REGISTRY))}"
        f" (aliases: {ALIASES}); or pass a preset directory (with {CONFIG_FILE}) "
        "or a Hugging Face handle 'hf://org/repo'.")


def resolve_directory(handle):
    """A local directory for a preset directory or "hf://" handle."""
    handle = str(handle)
    if handle.startswith("hf://"):
        from keras_vitscale import hub

        return Path(hub.download_preset(handle))
    path = Path(handle).expanduser()
    if path.is_dir():
        return path
    raise _unknown_preset_error(handle)


def read_directory_config(directory):
    """Reads and checks config.json of a preset directory; returns ViTConfig."""
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


def load(cls, handle, num_classes=None, image_size=None, load_weights=True, dtype=None,
         resample="linear", **overrides):
    """Implements `ViT.from_preset`; see there."""
    changes = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    handle = str(handle)
    name = ALIASES.get(handle, handle)
    if name in REGISTRY and not Path(handle).is_dir():
        config = builtin_config(name, **changes)
        weights = REGISTRY[name].get("weights")
        if not (load_weights and weights):
            if load_weights and name not in _warned_no_weights:
                _warned_no_weights.add(name)
                logger.warning("Preset %r has no published weights; building it with "
                               "fresh random weights.", name)
            return cls(config=config, dtype=dtype)
        directory = resolve_directory(weights)
        source = read_directory_config(directory)
    else:
        directory = resolve_directory(handle)
        source = read_directory_config(directory)
        config = source.replace(**changes) if changes else source
    model = cls(config=config, dtype=dtype)
    if load_weights:
        load_weights_into(model, weights_path(directory), source_config=source,
                          resample=resample)
    return model


def weights_path(directory):
    directory = Path(directory)
    sharded = directory / SHARDED_WEIGHTS_FILE
    return sharded if sharded.exists() else directory / WEIGHTS_FILE


def save(model, directory, max_shard_size_gb=None, metadata=None):
    """Implements `ViT.save_to_preset`; see there."""
    import keras

    import keras_vitscale

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


def _read_error(path, err):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return ValueError(
        f"Could not read weights file {str(path)!r} ({size} bytes): it is truncated "
        f"or corrupt ({type(err).__name__}: {err}). Download the preset again or "
        "re-save it with model.save_to_preset().")


def _stored_posemb_length(path):
    """Length of the learned position embedding stored in a weights file."""
    import h5py

    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and "position_embedding" in name:
            found.append(obj.shape)

    files = [path]
    if str(path).endswith(".json"):
        files = sorted(Path(path).parent.glob("model_*.weights.h5"))
    for file in files:
        with h5py.File(file, "r") as f:
            f.visititems(visit)
    return found[0][1] if found else None


def _infer_grid(config, length):
    """The patch grid that a stored position embedding of `length` covers."""
    patches = length - int(config.posemb_covers_class_token)
    rows, cols = config.grid_size
    side = int(round(patches ** 0.5))
    if side * side == patches:
        return side, side
    if rows * cols == patches:
        return rows, cols
    raise ValueError(
        f"Cannot tell the patch grid of a stored position embedding with {patches} "
        "patches; load it through a preset directory, whose config.json records "
        "the image size.")


def load_weights_into(model, path, source_config=None, resample="linear",
                      skip_mismatch=False, **kwargs):
    """Loads weights saved from a ViT of `source_config` into `model`.

    Same shapes load directly. Otherwise a model of the source config is
    built, loaded, and its weights copied by path: a position embedding for
    another grid is resampled, a head of another size is left fresh.
    """
    import keras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    target = model.config
    if source_config is None:
        source_config = target
        if target.posemb == "learn":
            try:
                length = _stored_posemb_length(path)
            except OSError as err:
                raise _read_error(path, err) from err
            if length is not None and length != target.posemb_length:
                grid = _infer_grid(target, length)
                source_config = target.replace(image_size=(grid[0] * target.patch_size[0],
                                                           grid[1] * target.patch_size[1]))
    same_shapes = source_config.parameter_shapes() == target.parameter_shapes()
    try:
        if same_shapes:
            keras.Model.load_weights(model, str(path), skip_mismatch=skip_mismatch, **kwargs)
            return
        source = type(model)(config=source_config, dtype=model.dtype_policy)
        keras.Model.load_weights(source, str(path), **kwargs)
    except (OSError, EOFError) as err:
        raise _read_error(path, err) from err
    transfer_weights(source, model, resample=resample)


def transfer_weights(source, target, resample="linear"):
    """Copies weights by variable path, resampling the position embedding."""
    source_vars = {v.path: v for v in source.weights}
    fresh = []
    for variable in target.weights:
        src = source_vars.get(variable.path)
        if src is None:
            fresh.append(variable.path)
            continue
        value = np.asarray(src.numpy())
        if tuple(value.shape) != tuple(variable.shape):
            if variable.path.startswith("position_embedding/"):
                from keras_vitscale.layers.embedding import resample_grid

                value = resample_grid(value, source.config.grid_size, target.config.grid_size,
                                      method=resample)
                logger.warning("Resampled the position embedding from grid %s to %s (%s).",
                            source.config.grid_size, target.config.grid_size, resample)
            elif variable.path.startswith(("head/", "pre_logits/")):
                fresh.append(variable.path)
                continue
            else:
                raise ValueError(
                    f"Cannot load {variable.path}: stored shape {value.shape}, model "
                    f"shape {tuple(variable.shape)}. Only the image size and the "
                    "number of classes may differ from the preset.")
        variable.assign(value)
    if fresh:
        logger.warning("Left freshly initialised (not in the checkpoint or another "
                       "size): %s", fresh)
