"""Builds a model from a built-in preset name or a preset directory.

The model class comes in as an argument (`cls`) and so does the function
that turns a handle into a local directory (`resolve`): `ViT.from_preset`
passes the Hub-aware one, so this package imports neither the model nor
the Hub.
"""

import logging
from pathlib import Path

from keras_vitscale.presets.directory import (read_directory_config, resolve_directory,
                                              weights_path)
from keras_vitscale.presets.registry import builtin_config, parse_handle, weights_entry
from keras_vitscale.presets.transfer import load_weights_into

logger = logging.getLogger("keras_vitscale")

_warned_no_weights = set()


def load(cls, handle, num_classes=None, image_size=None, load_weights=True, dtype=None,
         resample="linear", resolve=resolve_directory, **overrides):
    """Implements `ViT.from_preset` (see there for the arguments).

    Args:
        cls: the model class to build (`kvs.ViT`).
        handle: "PRESET[.TAG][@REVISION]" (a built-in preset; with
            `load_weights` its tag's checkpoint), a preset directory, or other
            handles as far as `resolve` understands them.
        resolve: handle -> local preset directory; default: local paths only
            (`ViT.from_preset` passes `keras_vitscale.pretrained.resolve_directory`,
            which also downloads and converts checkpoints and "hf://" handles).

    Example:
    ```python
    model = load(kvs.ViT, "out/vit_mu8", image_size=64)
    ```
    """
    changes = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    handle = str(handle)
    parsed = None if Path(handle).expanduser().is_dir() else parse_handle(handle)
    if parsed is not None:
        entry = weights_entry(parsed.name, parsed.tag)  # an unknown tag fails here
        if parsed.revision and entry is None:
            raise ValueError(f"{handle!r}: preset {parsed.name!r} has no published weights, "
                             "so it has no revisions; drop the '@...'.")
        config = builtin_config(parsed.name, tag=entry and entry["tag"], **changes)
        if not (load_weights and entry):
            if load_weights and parsed.name not in _warned_no_weights:
                _warned_no_weights.add(parsed.name)
                logger.warning("Preset %r has no published weights; building it with "
                               "fresh random weights.", parsed.name)
            return cls(config=config, dtype=dtype)
        directory = resolve(handle)
        source = read_directory_config(directory)
    else:
        directory = resolve(handle)
        source = read_directory_config(directory)
        config = source.replace(**changes) if changes else source
    model = cls(config=config, dtype=dtype)
    if load_weights:
        load_weights_into(model, weights_path(directory), source_config=source,
                          resample=resample)
    return model
