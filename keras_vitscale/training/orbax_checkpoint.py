"""JAX only: the multi-process checkpoint format, written with Orbax.

In a run over several JAX processes a sharded variable is a global array of
which each process holds only some shards, so it cannot be gathered into one
numpy file. Orbax writes each process's shards of every array into one
shared checkpoint directory (tensorstore, zarr) and the primary process
commits it by renaming its temporary directory, so a checkpoint is either
whole or absent, as in the one-process format (`npz_checkpoint.py`).

Layout of one checkpoint directory: `state/` holds the variables by
position ("v0", "v1", ...), `meta/` the meta dict the manager gives (step,
paths, dtypes, data position, ...) plus "format" and "process_count".
Reading places each process's shards straight into the variables' current
shardings. Unlike the one-process format there is no file checksum: a
checkpoint with missing or unreadable files fails to read (a ValueError).

`checkpoint.CheckpointManager` picks this format to write in a run of
several processes, and to read any checkpoint in it (so a run can resume on
a different number of processes); it does not import the manager. Every
process calls `save` and `read` (they synchronise). On another backend than
JAX they raise `CheckpointError`, saying so.
"""

import contextlib

import keras
import numpy as np

from keras_vitscale.training.errors import CheckpointError

NAME = "orbax"


def _jax():
    # Not a ValueError: the manager would take that for a corrupt checkpoint.
    backend = keras.backend.backend()
    if backend != "jax":
        raise CheckpointError(
            f"Orbax checkpoints (of a multi-process run) need the JAX backend but the "
            f"Keras backend is {backend!r}; set KERAS_BACKEND=jax to write or read them.")
    import jax

    return jax


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "Checkpoints of a multi-process JAX run need orbax-checkpoint; install it "
            "with `pip install 'keras-vitscale[jax]'` (or `pip install orbax-checkpoint`)."
        ) from None
    return ocp


def matches(path):
    """Whether the checkpoint directory `path` is in the Orbax format."""
    return (path / "state").is_dir() and not (path / "state.npz").exists()


def is_primary():
    """Whether this process prunes old checkpoints: process 0 only."""
    return _jax().process_index() == 0


def read(path, variables):
    """(meta, values) of the Orbax checkpoint at `path`, placed like `variables`.

    Raises:
        ValueError: the checkpoint cannot be read, or its variables differ
            from `variables` (the message says what is wrong).

    Example:
    ```python
    meta, arrays = read(Path("run/checkpoints/ckpt_00000100"), variables)
    ```
    """
    jax = _jax()
    ocp = _ocp()
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as checkpointer:
        try:
            meta = checkpointer.restore(
                path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # missing or torn files raise many types
            raise ValueError(f"meta unreadable ({type(err).__name__}: {_first_line(err)})"
                             ) from None
        paths = [v.path for v in variables]
        if meta.get("paths") != paths:
            raise ValueError(f"it holds {len(meta.get('paths', []))} variables that "
                             f"do not match this model's {len(paths)}")
        target = {f"v{i}": jax.ShapeDtypeStruct(tuple(v.shape), v.value.dtype,
                                                sharding=v.value.sharding)
                  for i, v in enumerate(variables)}
        try:
            state = checkpointer.restore(
                path, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:
            raise ValueError(f"state unreadable ({type(err).__name__}: {_first_line(err)})"
                             ) from None
    return meta, [state["state"][f"v{i}"] for i in range(len(variables))]


def _first_line(err, limit=300):
    """The start of an error's message (tensorstore's embed their whole spec)."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + "..."


def values(variables):
    """The global arrays to save (each process holds some of their shards)."""
    return [v.value for v in variables]


def all_finite(arrays):
    """One bool per array, computed where the shards are (no gathering)."""
    jax = _jax()
    import jax.numpy as jnp

    flags = jax.jit(lambda xs: [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
        for x in xs])(arrays)
    # A scalar cannot be sharded: every process holds the whole flag.
    return [bool(np.asarray(f.addressable_data(0))) for f in flags]


def save(final, arrays, meta):
    """Writes `arrays` and `meta` to the directory `final` (every process).

    Args:
        final: the checkpoint directory, on storage all processes share;
            an existing one (a rerun reaching the same step) is replaced
            whole.
        arrays: from `values`.
        meta: the JSON-able meta dict; "format" and "process_count" are
            added.

    Example:
    ```python
    save(Path("run/checkpoints/ckpt_00000100"), values(variables), {"step": 100})
    ```
    """
    jax = _jax()
    ocp = _ocp()
    meta = {**meta, "format": NAME, "process_count": jax.process_count()}
    state = {f"v{i}": a for i, a in enumerate(arrays)}
    # force: replace a checkpoint of the same step. Orbax writes into a
    # temporary directory and renames it when every process has finished.
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as c:
        c.save(final, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
