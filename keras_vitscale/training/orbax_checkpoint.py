"""JAX only: multi-host checkpoints with Orbax, same interface as the .npz one.

In a run over several JAX processes a sharded variable is a global array of
which each process holds only some shards, so it cannot be gathered into one
numpy file. Orbax writes each process's shards of every array into one
shared checkpoint directory (tensorstore, zarr) and the primary process
commits it by renaming its temporary directory, so a checkpoint is either
whole or absent, as with `CheckpointManager`.

Layout: WORKDIR/checkpoints/ckpt_00001000/{state/, meta/}: `state` holds the
variables by position ("v0", "v1", ...), `meta` the same meta dict as the
.npz format (step, paths, dtypes, data position, ...). Restoring reads each
process's shards straight into the variables' current shardings. Unlike the
.npz format there is no file checksum: a checkpoint with missing or
unreadable files fails to restore and is skipped for the previous one.

Either manager reads the other's format, so a run can resume on a different
number of processes.
"""

import contextlib
import shutil

import keras
import numpy as np

from keras_vitscale.training.checkpoint import CheckpointManager


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "Checkpoints of a multi-process JAX run need orbax-checkpoint; install it "
            "with `pip install 'keras-vitscale[jax]'` (or `pip install orbax-checkpoint`)."
        ) from None
    return ocp


def is_orbax(path):
    """Whether the checkpoint directory `path` is in the Orbax format."""
    return (path / "state").is_dir() and not (path / "state.npz").exists()


def read(path, variables):
    """(meta, values) of the Orbax checkpoint at `path`, placed like `variables`.

    Raises ValueError (naming what is wrong) if it cannot be restored.
    """
    import jax

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


def _all_finite(variables):
    """One bool per variable, computed where the shards are (no gathering)."""
    import jax
    import jax.numpy as jnp

    values = [v.value for v in variables]
    flags = jax.jit(lambda xs: [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
        for x in xs])(values)
    # A scalar cannot be sharded: every process holds the whole flag.
    return [bool(np.asarray(f.addressable_data(0))) for f in flags]


class OrbaxCheckpointManager(CheckpointManager):
    """`CheckpointManager` for multi-process JAX runs, written with Orbax.

    The same interface and guarantees: atomic checkpoints, the newest `keep`
    kept, a corrupt checkpoint skipped for the previous one, `CheckpointError`
    when none is valid, no checkpoint of non-finite parameters. Every process
    calls `save` and `restore_latest` (they synchronise); `workdir` must be
    the same shared directory for all of them.

    Args:
        workdir: the run directory.
        keep: how many of the newest checkpoints to keep.
        log: where reports go (default: stderr).

    Example:
    ```python
    manager = OrbaxCheckpointManager("gs://bucket/run", keep=3)
    manager.save(100, model, optimizer, extra={"data_position": 6400})
    meta = manager.restore_latest(model, optimizer)  # None if no checkpoint
    ```
    """

    def save(self, step, model, optimizer, extra=None):
        """Writes checkpoint `step` (all processes) and prunes old ones.

        Raises ValueError if a parameter is non-finite.
        """
        import jax

        ocp = _ocp()
        variables = self._variables(model, optimizer)
        for v, finite in zip(variables, _all_finite(variables), strict=True):
            if not finite:
                raise ValueError(f"variable {v.path} is non-finite at step {step}")
        meta = {
            "step": int(step),
            "paths": [v.path for v in variables],
            "dtypes": [str(v.dtype) for v in variables],
            "backend": keras.backend.backend(),
            "format": "orbax",
            "process_count": jax.process_count(),
            **(extra or {}),
        }
        state = {f"v{i}": v.value for i, v in enumerate(variables)}
        # resolve(): the checkpoints directory may be a link to storage that
        # all hosts share, made before the first checkpoint exists.
        self.directory.resolve().mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        # force: a rerun reaching the same step replaces it whole. Orbax
        # writes into a temporary directory and renames it when every
        # process has finished.
        with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as c:
            c.save(final, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if jax.process_index() == 0:
            for old in self.steps()[:-self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def _read(self, step, variables):
        if is_orbax(self.path(step)):
            return read(self.path(step), variables)
        return super()._read(step, variables)
