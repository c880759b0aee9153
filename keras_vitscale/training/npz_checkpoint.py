"""The one-process checkpoint format: state.npz + meta.json, self-checking.

Layout of one checkpoint directory: `state.npz` holds the variables by
position ("v0", "v1", ...), `meta.json` the meta dict the manager gives
(step, variable paths and dtypes, data position, ...) plus the SHA-256 of
state.npz. A checkpoint is written into a hidden temporary directory and
renamed into place, so a crash (even SIGKILL) leaves either the whole
checkpoint or nothing; on reading, files that are missing, truncated or
altered are a ValueError. bfloat16 values go through float32 (exact both
ways).

Backend-neutral: values are read with `keras.ops.convert_to_numpy` (and
written back by the manager with `Variable.assign`), so it works on JAX,
TensorFlow and torch. `checkpoint.CheckpointManager` picks this format for
a run of one process; it does not import the manager.
"""

import hashlib
import json
import os
import shutil

import keras
import numpy as np

NAME = "npz"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_primary():
    """Whether this process prunes old checkpoints: always (one process)."""
    return True


def values(variables):
    """The numpy arrays to save (bfloat16 as float32)."""
    arrays = []
    for v in variables:
        value = keras.ops.convert_to_numpy(v.value)
        arrays.append(value.astype(np.float32) if value.dtype.name == "bfloat16" else value)
    return arrays


def all_finite(arrays):
    """One bool per array: no NaN or infinity (non-float arrays are finite)."""
    return [a.dtype.kind != "f" or bool(np.all(np.isfinite(a))) for a in arrays]


def save(final, arrays, meta):
    """Writes `arrays` and `meta` to the directory `final`, atomically.

    Args:
        final: the checkpoint directory (its parent exists); an existing
            one (a rerun reaching the same step) is replaced whole.
        arrays: from `values`.
        meta: the JSON-able meta dict; the SHA-256 of state.npz is added.

    Example:
    ```python
    save(Path("run/checkpoints/ckpt_00000100"), values(variables), {"step": 100})
    ```
    """
    tmp = final.parent / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    np.savez(tmp / "state.npz", **{f"v{i}": a for i, a in enumerate(arrays)})
    meta = {**meta, "sha256": _sha256(tmp / "state.npz")}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    for name in ("state.npz", "meta.json"):
        _fsync(tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def read(path, variables):
    """(meta, values) of the checkpoint at `path`, checked against `variables`.

    Raises:
        ValueError: a file missing, unreadable or not matching its
            checksum, or variables that differ from `variables` (the
            message says which).

    Example:
    ```python
    meta, arrays = read(Path("run/checkpoints/ckpt_00000100"), model.variables)
    ```
    """
    try:
        with open(path / "meta.json") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"meta.json unreadable ({type(err).__name__}: {err})") from None
    state = path / "state.npz"
    if not state.exists():
        raise ValueError("state.npz is missing")
    if _sha256(state) != meta.get("sha256"):
        raise ValueError("state.npz does not match its SHA-256 in meta.json "
                         "(truncated or altered)")
    paths = [v.path for v in variables]
    if meta.get("paths") != paths:
        raise ValueError(f"it holds {len(meta.get('paths', []))} variables that "
                         f"do not match this model's {len(paths)}")
    try:
        with np.load(state) as data:
            arrays = [data[f"v{i}"] for i in range(len(variables))]
    except Exception as err:  # zip/npy errors come in many types
        raise ValueError(f"state.npz unreadable ({type(err).__name__}: {err})") from None
    for v, value in zip(variables, arrays):
        if tuple(value.shape) != tuple(v.shape):
            raise ValueError(f"{v.path} has shape {value.shape}, model wants {tuple(v.shape)}")
    return meta, arrays
