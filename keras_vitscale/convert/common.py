"""What every importer shares: checked copying of foreign arrays into a ViT.

An importer describes, for each variable of `ViTConfig.parameter_shapes()`,
which source arrays make it, the shape each must have, and how to combine
them into our layout (a `Source`). `gather_weights` then reads them, checks
every shape before any transpose or reshape (a reshape can hide a wrong head
count), and refuses the checkpoint when a key is missing, a shape is wrong,
or a source key is left over: a leftover means the checkpoint has a feature
the config cannot express, so dropping it quietly would change the outputs.

Example:
```python
recipe = lambda path, shape: Source(("w",), (shape[::-1],), lambda w: w.T)
weights = gather_weights(config, {"w": array}, recipe, source_name="mine")
```
"""

import collections
import logging
import math

import numpy as np

logger = logging.getLogger("keras_vitscale")

Source = collections.namedtuple("Source", ["keys", "shapes", "combine"])
Source.__doc__ = """How one of our variables is made from source arrays.

Args:
    keys: the source keys, in the order `combine` takes them.
    shapes: the shape each source array must have for the target config.
    combine: `combine(*arrays)` -> the float32 array in our layout.
"""


def as_float32(value):
    """A numpy float32 copy of a numpy array, torch tensor or bfloat16 bits.

    bfloat16 arrives as numpy "void" (np.save of an ml_dtypes array, as
    big_vision writes it), as uint16 bit patterns (no model parameter is an
    integer, so these can only be bits) or as torch.bfloat16; all widen
    exactly. Other integer arrays are refused rather than cast.
    """
    if hasattr(value, "detach"):  # torch: bfloat16 has no numpy dtype
        return value.detach().cpu().float().numpy()
    array = np.asarray(value)
    if array.dtype.itemsize == 2 and array.dtype.kind in "Vu":
        # bfloat16 is the upper half of a float32: shift the bits back in.
        bits = array.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if array.dtype.kind != "f":
        raise ValueError(f"A weight of dtype {array.dtype} is not a float; save the "
                         "checkpoint's parameters as float32, float16 or bfloat16.")
    return array.astype(np.float32)


def _listed(items, limit=8):
    return f"{items[:limit]}{f' ... ({len(items)} in all)' if len(items) > limit else ''}"


def gather_weights(config, source, recipe, *, source_name, skip=(), ignored=None,
                   hint=""):
    """{variable path: float32 array} for every variable `config` builds.

    Args:
        config: the target `ViTConfig`.
        source: `{source key: array}` (numpy, torch or bfloat16 bits).
        recipe: `recipe(path, shape)` -> `Source` for each of our variables.
        source_name: the format, for messages ("big_vision", ...).
        skip: prefixes of our variable paths not to fill (e.g. "head/" for a
            fresh head); their source keys count as used.
        ignored: `{source key: reason}` for keys deliberately left out; they
            are logged, not errors.
        hint: a last line for the error message: what to check or pass.

    Raises:
        ValueError: listing leftover source keys, missing keys and the first
            shape mismatches (source name, its shape, the shape needed).
    """
    ignored = dict(ignored or {})
    used, weights, missing, mismatched = set(), {}, [], []
    for path, shape in config.parameter_shapes().items():
        spec = recipe(path, tuple(shape))
        absent = [k for k in spec.keys if k not in source]
        used.update(k for k in spec.keys if k in source)
        if any(path.startswith(prefix) for prefix in skip):
            continue
        if absent:
            missing.append(f"{path} (needs {', '.join(absent)})")
            continue
        bad = [f"{k} {tuple(source[k].shape)}, needs {tuple(want)}"
               for k, want in zip(spec.keys, spec.shapes)
               if tuple(source[k].shape) != tuple(want)]
        if bad:
            mismatched.append(f"{path}: " + "; ".join(bad))
            continue
        array = spec.combine(*(as_float32(source[k]) for k in spec.keys))
        if array.shape != tuple(shape):  # a recipe bug, not a checkpoint problem
            raise RuntimeError(f"{source_name} recipe made {array.shape} for {path}, "
                               f"which needs {tuple(shape)}.")
        weights[path] = array
    leftover = sorted(set(source) - used - set(ignored))
    errors = []
    if mismatched:
        errors.append(f"{len(mismatched)} shape mismatch(es), first: {_listed(mismatched, 5)}")
    if missing:
        errors.append(f"{len(missing)} variable(s) with no {source_name} key: {_listed(missing)}")
    if leftover:
        errors.append(f"{len(leftover)} {source_name} key(s) the model has no variable for: "
                      f"{_listed(leftover)}")
    if errors:
        raise ValueError(
            f"The {source_name} weights do not fit the config (width {config.width}, "
            f"depth {config.depth}, mlp_dim {config.mlp_dim}, heads {config.num_heads}, "
            f"patch {config.patch_size}, image {config.image_size}, pooling "
            f"{config.pooling!r}, class_token {config.class_token}):\n  "
            + "\n  ".join(errors) + (f"\n{hint}" if hint else ""))
    for key, reason in sorted(ignored.items()):
        if key in source:
            logger.info("%s: left out %s (%s)", source_name, key, reason)
    return weights


def infer_grid(length, has_cls, patch, image_size=None, key="position embedding"):
    """(image_size, posemb_covers_class_token) from a position-embedding length.

    Args:
        length: positions in the stored embedding.
        has_cls: whether the model has a class token (which may own one).
        patch: (ph, pw).
        image_size: the training size when known (required for non-square
            grids); then only the class-token question is answered.
        key: the checkpoint's name for the embedding, for messages.
    """
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        patches = (h // patch[0]) * (w // patch[1])
        if length == patches or (has_cls and length == patches + 1):
            return (h, w), length == patches + 1
        raise ValueError(
            f"{key} has {length} positions but image_size {(h, w)} with patch {patch} "
            f"gives {patches} patches{' (+1 class token)' if has_cls else ''}; pass the "
            "image size the checkpoint was trained at, then resample with "
            "ViT.from_preset(..., image_size=...).")
    # A class token with its own position first: 197 = 14*14 + 1 reads as a
    # 14x14 grid, not as a 197-patch strip (which no square side gives).
    for covers in (True, False) if has_cls and length > 1 else (False,):
        side = math.isqrt(length - covers)
        if side * side == length - covers:
            return (side * patch[0], side * patch[1]), covers
    raise ValueError(
        f"{key} length {length} is not a square grid"
        f"{' (with or without a class-token position)' if has_cls else ''}; pass "
        "image_size=(height, width) for a non-square checkpoint.")
