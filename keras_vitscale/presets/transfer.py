"""Weight transfer: load weights saved at another resolution or head size.

The position embedding of another patch grid is resampled; a head of
another size is left fresh. The model class is never imported: a source
model of another shape is built with `type(model)`.
"""

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("keras_vitscale")


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
    patches = length - (config.posemb_length - config.num_patches)  # the prefix positions
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
    built (`type(model)`), loaded, and its weights copied by path: a position
    embedding for another grid is resampled, a head of another size is left
    fresh.

    Args:
        model: the `kvs.ViT` to load into.
        path: a .weights.h5 file or a sharded .weights.json index.
        source_config: the `ViTConfig` the weights were saved from; default:
            the model's, with the grid read from a learned position embedding.
        resample: "linear" (big_vision) or "bicubic" (timm).
        skip_mismatch: passed to `keras.Model.load_weights` for same shapes.

    Example:
    ```python
    bigger = kvs.ViT(variant="mu/8", image_size=64, num_classes=4)
    load_weights_into(bigger, "small.weights.h5")   # saved at 32 x 32
    ```
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
    """Copies weights by variable path, resampling the position embedding.

    Args:
        source: the model holding the weights.
        target: the model to fill; variables missing from `source`, and a
            head or pre-logits of another size, are left as they are.
        resample: "linear" or "bicubic" position-embedding resampling.

    Example:
    ```python
    transfer_weights(model_at_224, model_at_384, resample="bicubic")
    ```
    """
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
