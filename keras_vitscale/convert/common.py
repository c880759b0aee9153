"""What every importer shares: checked copying of foreign arrays into a ViT.

Each source module (timm, big_vision, transformers) only says how its names
and layouts map to ours; this module does the rest. An importer describes,
for each variable of `ViTConfig.parameter_shapes()`, which source arrays make
it, the shape each must have, and how to combine them into our layout (a
`Source`). `gather_weights` checks every key and shape first, from the shapes
alone and before any transpose or reshape (a reshape can hide a wrong head
count), and refuses the checkpoint when a key is missing, a shape is wrong,
or a source key is left over: a leftover means the checkpoint has a feature
the config cannot express, so dropping it quietly would change the outputs.

Only then is data read, lazily: `gather_weights` returns `ConvertedWeights`,
a mapping that reads and converts one variable's source tensors per lookup.
`assign_weights` walks it, assigning each array and dropping it, so the peak
memory of a conversion is the model plus one tensor. `build_model` builds
the `kvs.ViT` and keeps or replaces the source's head.

Sources are read only through the `Mapping` interface (`in`, `[key]`,
iteration over keys) and their shapes through `shapes_of`: a mapping with a
`.shapes` dict (`files.SafetensorsReader`) is never read for its shapes, so
one that reads a tensor of a file per lookup works as well as a dict.

Example:
```python
recipe = lambda path, shape: Source(("w",), (shape[::-1],), lambda w: w.T)
weights = gather_weights(config, {"w": array}, recipe, source_name="mine")
for path, array in weights.items():   # read and converted one at a time
    ...
```
"""

import collections
import collections.abc
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
    return array.astype(np.float32, copy=False)


def shapes_of(source):
    """{key: shape tuple} of a source mapping, without reading tensor data.

    A mapping with a `.shapes` dict (`files.SafetensorsReader`,
    `ConvertedWeights`) answers from it; a mapping whose values are shapes
    (tuples, torch.Size) is taken as it is; otherwise each value's `.shape`
    (numpy arrays and torch tensors hold theirs without a read).

    Example:
    ```python
    shapes_of({"w": np.zeros((2, 3))})   # {'w': (2, 3)}
    shapes_of({"w": (2, 3)})             # {'w': (2, 3)}
    ```
    """
    shapes = getattr(source, "shapes", None)
    if isinstance(shapes, collections.abc.Mapping):
        return {k: tuple(int(n) for n in v) for k, v in shapes.items()}
    return {k: tuple(int(n) for n in (v if isinstance(v, (tuple, list)) else v.shape))
            for k, v in source.items()}


class ConvertedWeights(collections.abc.Mapping):
    """{variable path: float32 array}, each read and converted when looked up.

    `gather_weights` returns one after checking every key and shape; nothing
    is read until a lookup, and nothing is kept after it, so walking
    `.items()` holds one converted tensor at a time. `.shapes` gives every
    variable's shape without reading.

    Args:
        plan: `{variable path: (shape, Source)}`, already checked.
        source: the source mapping the `Source` keys index.
        source_name: the format, for messages.

    Example:
    ```python
    weights = gather_weights(config, source, recipe, source_name="timm")
    weights.shapes["head/kernel"]                   # no data read
    for path, array in weights.items():             # one array at a time
        variables[path].assign(array)
    ```
    """

    def __init__(self, plan, source, source_name):
        self._plan = dict(plan)
        self._source = source
        self._source_name = source_name
        self.shapes = {path: tuple(shape) for path, (shape, _) in self._plan.items()}

    def __getitem__(self, path):
        shape, spec = self._plan[path]
        array = spec.combine(*(as_float32(self._source[k]) for k in spec.keys))
        if tuple(array.shape) != tuple(shape):  # a recipe bug, not a checkpoint problem
            raise RuntimeError(f"{self._source_name} recipe made {array.shape} for {path}, "
                               f"which needs {tuple(shape)}.")
        return array

    def __iter__(self):
        return iter(self._plan)

    def __len__(self):
        return len(self._plan)

    @property
    def nbytes(self):
        """Bytes of the converted float32 arrays, all together."""
        return 4 * sum(math.prod(s) for s in self.shapes.values())


class RenamedSource(collections.abc.Mapping):
    """A source mapping seen under other key names, still read on lookup.

    Args:
        source: the mapping (a dict, or a lazy reader with `.shapes`).
        rename: `rename(key)` -> the new name, or None to leave the key out.

    Example:
    ```python
    RenamedSource(reader, lambda k: k[len("visual."):] if k.startswith("visual.") else None)
    ```
    """

    def __init__(self, source, rename):
        self._source = source
        self._names = {}
        for key in source:
            new = rename(key)
            if new is None:
                continue
            if new in self._names:
                raise ValueError(f"{key!r} and {self._names[new]!r} both become {new!r}; "
                                 "the checkpoint holds two copies of one tensor.")
            self._names[new] = key
        shapes = shapes_of(source)
        self.shapes = {new: shapes[key] for new, key in self._names.items()}

    def __getitem__(self, key):
        return self._source[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _listed(items, limit=8):
    return f"{items[:limit]}{f' ... ({len(items)} in all)' if len(items) > limit else ''}"


def gather_weights(config, source, recipe, *, source_name, skip=(), ignored=None,
                   hint=""):
    """Checks a source against `config`; the converted weights, read lazily.

    Every key and shape is checked from the shapes alone (`shapes_of`)
    before any tensor is read, so a checkpoint that does not fit fails fast
    and whole, listing every problem.

    Args:
        config: the target `ViTConfig`.
        source: `{source key: array}` (numpy, torch or bfloat16 bits), or a
            mapping that reads on lookup and has a `.shapes` dict.
        recipe: `recipe(path, shape)` -> `Source` for each of our variables.
        source_name: the format, for messages ("big_vision", ...).
        skip: prefixes of our variable paths not to fill (e.g. "head/" for a
            fresh head); their source keys count as used.
        ignored: `{source key: reason}` for keys deliberately left out; they
            are logged, not errors.
        hint: a last line for the error message: what to check or pass.

    Returns:
        `ConvertedWeights`: `{variable path: float32 array}` for every
        variable `config` builds (minus `skip`), each read on lookup.

    Raises:
        ValueError: listing leftover source keys, missing keys and the first
            shape mismatches (source name, its shape, the shape needed).

    Example:
    ```python
    weights = gather_weights(config, state_dict, recipe, source_name="timm")
    ```
    """
    ignored = dict(ignored or {})
    shapes = shapes_of(source)
    used, plan, missing, mismatched = set(), {}, [], []
    for path, shape in config.parameter_shapes().items():
        spec = recipe(path, tuple(shape))
        absent = [k for k in spec.keys if k not in shapes]
        used.update(k for k in spec.keys if k in shapes)
        if any(path.startswith(prefix) for prefix in skip):
            continue
        if absent:
            missing.append(f"{path} (needs {', '.join(absent)})")
            continue
        bad = [f"{k} {shapes[k]}, needs {tuple(want)}"
               for k, want in zip(spec.keys, spec.shapes) if shapes[k] != tuple(want)]
        if bad:
            mismatched.append(f"{path}: " + "; ".join(bad))
            continue
        plan[path] = (tuple(shape), spec)
    leftover = sorted(set(shapes) - used - set(ignored))
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
        if key in shapes:
            logger.info("%s: left out %s (%s)", source_name, key, reason)
    return ConvertedWeights(plan, source, source_name)


def stream_weights(config, source, recipe, *, source_name, verbose=False, **options):
    """Yields (variable path, float32 array), checked first, one tensor at a time.

    `gather_weights` checks every key and shape before the first item; each
    array is then read and converted as it is yielded, so a caller that
    assigns it and lets it go holds the model plus one tensor.

    Args:
        config, source, recipe, source_name: as `gather_weights`.
        verbose: show a progress bar (keras Progbar) over the tensors.
        **options: `skip`, `ignored`, `hint`, as `gather_weights`.

    Raises:
        ValueError: as `gather_weights`, when called (before iterating).

    Example:
    ```python
    for path, array in stream_weights(config, reader, recipe, source_name="timm"):
        variables[path].assign(array)
    ```
    """
    weights = gather_weights(config, source, recipe, source_name=source_name, **options)
    return _one_at_a_time(weights, list(weights), verbose)


def _one_at_a_time(weights, paths, verbose):
    """(path, weights[path]) for each path, with an optional progress bar."""
    import keras

    bar = keras.utils.Progbar(len(paths), unit_name="tensor") if verbose else None
    since_trim = 0
    for i, path in enumerate(paths):
        array = weights[path]
        since_trim += array.nbytes
        yield path, array
        del array
        if since_trim >= _TRIM_EVERY:
            since_trim = 0
            release_freed_memory()
        if bar is not None:
            bar.update(i + 1)
    release_freed_memory()


# Bytes converted between two `release_freed_memory` calls.
_TRIM_EVERY = 256 << 20


def release_freed_memory():
    """Hands memory freed by the C heap back to the OS (glibc's malloc_trim).

    Each converted tensor is freed once assigned, but glibc keeps freed
    blocks of the sizes it has seen in its heap (it raises its mmap
    threshold after the first large free), so without a trim a conversion's
    resident memory grows by much of the checkpoint's size. A no-op where
    the C library has no malloc_trim.
    """
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


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
            the source's `gather_weights` call (checked before the model is
            built; its arrays are read one at a time while assigning).
        source_name: the converter, for the log ("from_timm", ...).
        name, dtype: as `from_timm` and its siblings take them.
        verbose: show a progress bar over the tensors copied.

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
    Shapes are checked first (from `shapes_of(weights)`, no data read); then
    each array is looked up, assigned and dropped before the next, so a lazy
    `ConvertedWeights` holds one converted tensor at a time.

    Args:
        model: a `kvs.ViT`.
        weights: `{variable.path: numpy array}` in our layout, or the
            `ConvertedWeights` of `gather_weights`.
        verbose: show a progress bar (keras Progbar) over the tensors.

    Raises:
        ValueError: an array whose shape differs from its variable's (named).
        RuntimeError: the model and its config disagree, or a converter
            left a variable out.

    Example:
    ```python
    assign_weights(model, gather_weights(model.config, source, recipe, source_name="x"))
    ```
    """
    variables = {v.path: v for v in model.weights}
    expected = model.config.parameter_shapes()
    if set(variables) != set(expected):
        raise RuntimeError(
            "kvs.ViT's variables differ from ViTConfig.parameter_shapes(): only in the "
            f"model {sorted(set(variables) - set(expected))[:5]}, only in the config "
            f"{sorted(set(expected) - set(variables))[:5]}; fix config.py or model.py.")
    shapes = shapes_of(weights)
    unfilled = [p for p in expected if p not in shapes and not p.startswith("head/")]
    if unfilled:
        raise RuntimeError(f"No weights for {unfilled[:5]}; the converter skipped them.")
    problems = [f"{path} {shape}, the variable is {tuple(variables[path].shape)}"
                if path in variables else f"{path} (the model has no such variable)"
                for path, shape in shapes.items()
                if path not in variables or shape != tuple(variables[path].shape)]
    if problems:
        raise ValueError(f"{len(problems)} converted weight(s) do not fit the model: "
                         f"{_listed(problems, 5)}; convert with the model's own config.")
    # One lookup, one assignment: the array is dropped before the next read.
    for path, array in _one_at_a_time(weights, list(shapes), verbose):
        variables[path].assign(array)
        del array
