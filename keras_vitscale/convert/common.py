"""What every importer shares: checked copying of foreign arrays into a ViT.

Each source module (timm, big_vision, transformers) only says how its names
and layouts map to ours; this module does the rest. An importer describes,
for each variable of `ViTConfig.parameter_shapes()`, which source arrays make
it, the shape each must have, and how to combine them into our layout (a
`Source`). `gather_weights` then reads them, checks
every shape before any transpose or reshape (a reshape can hide a wrong head
count), and refuses the checkpoint when a key is missing, a shape is wrong,
or a source key is left over: a leftover means the checkpoint has a feature
the config cannot express, so dropping it quietly would change the outputs.

`build_model` then builds the `kvs.ViT`, keeps or replaces the source's
head, and `assign_weights` copies the arrays in by variable path.

Sources are read only through the `Mapping` interface (`in`, `[key]`,
`.shape`, iteration over keys), so a mapping that reads one tensor of a file
per lookup (see `convert/files.py`) works as well as a dict.

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

from keras_vitscale.config import ViTConfig, parse_variant

logger = logging.getLogger("keras_vitscale")

Source = collections.namedtuple("Source", ["keys", "shapes", "combine"])
Source.__doc__ = """How one of our variables is made from source arrays.

Args:
    keys: the source keys, in the order `combine` takes them.
    shapes: the shape each source array must have for the target config.
    combine: `combine(*arrays)` -> the float32 array in our layout.
"""


# What `variant=` fixes in a converter.
_SHAPE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


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
            f"block {config.block!r}, patch {config.patch_size}, image {config.image_size}, "
            f"pooling {config.pooling!r}, class_token {config.class_token}):\n  "
            + "\n  ".join(errors) + (f"\n{hint}" if hint else ""))
    for key, reason in sorted(ignored.items()):
        if key in source:
            logger.info("%s: left out %s (%s)", source_name, key, reason)
    return weights


def build_model(cls, config, num_classes, weights_for, *, source_name, name="vit",
                dtype=None, verbose=False):
    """The `cls` model (a `kvs.ViT`) of `config` holding the converted weights.

    The model class is an argument so that this module never imports
    model.py: the pretrained-weights loader, which model.py imports, uses it.

    Args:
        cls: the model class, `kvs.ViT` (called as `cls(config=..., name=...,
            dtype=...)`).
        config: the `ViTConfig` read from the source (its head included).
        num_classes: None keeps the source's head; 0 drops it (features
            out); another count gets a fresh head of that size.
        weights_for: `weights_for(config, drop_head)` -> `{path: array}`,
            the source's `gather_weights` call.
        source_name: the converter, for the log ("from_timm", ...).
        name, dtype, verbose: as `from_timm` and its siblings take them.

    Example:
    ```python
    model = build_model(kvs.ViT, config, None,
                        lambda c, drop: convert_params(params, c, drop),
                        source_name="from_big_vision")
    ```
    """
    source_classes = config.num_classes
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    new_head = config.num_classes != source_classes
    weights = weights_for(config, new_head)
    model = cls(config=config, name=name, dtype=dtype)
    assign_weights(model, weights, verbose=verbose)
    if new_head:
        logger.info("%s: dropped the source's %d-class head; %s", source_name, source_classes,
                    f"a fresh {config.num_classes}-class head" if config.num_classes
                    else "no head (features out)")
    return model


def assign_weights(model, weights, verbose=False):
    """Assigns `{variable path: array}` to `model`; the head may be absent (kept fresh).

    Every other variable named by `model.config.parameter_shapes()` must be
    in `weights`, so nothing keeps its random initial value by accident.

    Args:
        model: a `kvs.ViT`.
        weights: `{variable.path: numpy array}` in our layout.
        verbose: show a progress bar.

    Raises:
        ValueError: an array whose shape differs from its variable's (named).
        RuntimeError: the model and its config disagree, or a converter
            left a variable out.

    Example:
    ```python
    assign_weights(model, gather_weights(model.config, source, recipe, source_name="x"))
    ```
    """
    import keras

    variables = {v.path: v for v in model.weights}
    expected = model.config.parameter_shapes()
    if set(variables) != set(expected):
        raise RuntimeError(
            "kvs.ViT's variables differ from ViTConfig.parameter_shapes(): only in the "
            f"model {sorted(set(variables) - set(expected))[:5]}, only in the config "
            f"{sorted(set(expected) - set(variables))[:5]}; fix config.py or model.py.")
    unfilled = [p for p in expected if p not in weights and not p.startswith("head/")]
    if unfilled:
        raise RuntimeError(f"No weights for {unfilled[:5]}; the converter skipped them.")
    problems = [f"{path} {tuple(array.shape)}, the variable is "
                f"{tuple(variables[path].shape)}" if path in variables
                else f"{path} (the model has no such variable)"
                for path, array in weights.items()
                if path not in variables or tuple(array.shape) != tuple(variables[path].shape)]
    if problems:
        raise ValueError(f"{len(problems)} converted weight(s) do not fit the model: "
                         f"{_listed(problems, 5)}; convert with the model's own config.")
    bar = keras.utils.Progbar(len(weights), unit_name="weight") if verbose else None
    for i, (path, array) in enumerate(weights.items()):
        variables[path].assign(array)
        if bar is not None:
            bar.update(i + 1)


def variant_fields(variant):
    """The `ViTConfig` shape fields a `variant=` argument fixes, as a dict.

    Width, depth, MLP width and heads always; the patch size only when the
    variant names one ("B/16", not "B"). Everything else (pooling, class
    token, head, image size) stays what the checkpoint says.

    Example:
    ```python
    variant_fields("B/16")   # {'width': 768, ..., 'patch_size': (16, 16), 'variant': 'B/16'}
    ```
    """
    reference = ViTConfig.from_variant(variant)
    fields = {f: getattr(reference, f) for f in _SHAPE_FIELDS
              if f != "patch_size" or parse_variant(variant)[1] is not None}
    fields["variant"] = str(variant)
    return fields


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
