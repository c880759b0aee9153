"""Atomic, self-checking checkpoints: model variables, optimizer state, step,
data position and RNG state.

Layout: WORKDIR/checkpoints/ckpt_00001000/{state.npz, meta.json}. A
checkpoint is written into a hidden temporary directory and renamed into
place, so a crash (even SIGKILL) leaves either the whole checkpoint or
nothing. meta.json records the SHA-256 of state.npz; on restore a checkpoint
whose files are missing, truncated or altered is reported and skipped for the
previous one. Variables are stored by position with their paths and dtypes;
bfloat16 values go through float32 (exact both ways).

Backend-neutral: values are read with `keras.ops.convert_to_numpy` and
written with `Variable.assign`, so it works on JAX, TensorFlow and torch.
A multi-process JAX run cannot gather its sharded variables into one file:
`manager_for` gives it an `OrbaxCheckpointManager` (orbax_checkpoint.py),
same interface. Each manager reads the other's checkpoints.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import keras
import numpy as np

from keras_vitscale.training.errors import CheckpointError

PREFIX = "ckpt_"


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


def _to_numpy(variable):
    value = keras.ops.convert_to_numpy(variable.value)
    return value.astype(np.float32) if value.dtype.name == "bfloat16" else value


def manager_for(workdir, keep=3, process_count=1, log=None):
    """The checkpoint manager of a run over `process_count` processes.

    Args:
        workdir: the run directory (shared by all processes).
        keep: how many of the newest checkpoints to keep.
        process_count: JAX processes in the run; above 1 the checkpoints
            are written with Orbax (`pip install 'keras-vitscale[jax]'`).
        log: where reports go (default: stderr).

    Example:
    ```python
    manager = manager_for("runs/digits", keep=3, process_count=jax.process_count())
    ```
    """
    if process_count > 1:
        from keras_vitscale.training.orbax_checkpoint import OrbaxCheckpointManager

        return OrbaxCheckpointManager(workdir, keep=keep, log=log)
    return CheckpointManager(workdir, keep=keep, log=log)


class CheckpointManager:
    """Saves and restores training state in `workdir/checkpoints`.

    Args:
        workdir: the run directory.
        keep: how many of the newest checkpoints to keep.
        log: where reports go (default: stderr).

    Example:
    ```python
    manager = CheckpointManager("runs/digits", keep=3)
    manager.save(100, model, optimizer, extra={"data_position": 6400})
    meta = manager.restore_latest(model, optimizer)  # None if no checkpoint
    ```
    """

    def __init__(self, workdir, keep=3, log=None):
        self.directory = Path(workdir) / "checkpoints"
        self.keep = max(1, int(keep))
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    @classmethod
    def for_run(cls, workdir, keep=3, process_count=1, log=None):
        """`manager_for`: this class for one process, Orbax for several."""
        return manager_for(workdir, keep=keep, process_count=process_count, log=log)

    def steps(self):
        """Steps of the complete-looking checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
                found.append(int(path.name[len(PREFIX):]))
        return sorted(found)

    def path(self, step):
        return self.directory / f"{PREFIX}{step:08d}"

    @staticmethod
    def _variables(model, optimizer):
        return list(model.variables) + list(optimizer.variables)

    def save(self, step, model, optimizer, extra=None):
        """Writes checkpoint `step` atomically and prunes old ones.

        Raises ValueError if a parameter is non-finite (a checkpoint that
        would poison every resume is never written).
        """
        variables = self._variables(model, optimizer)
        arrays = {f"v{i}": _to_numpy(v) for i, v in enumerate(variables)}
        for i, v in enumerate(variables):
            a = arrays[f"v{i}"]
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise ValueError(f"variable {v.path} is non-finite at step {step}")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp_{PREFIX}{step:08d}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        np.savez(tmp / "state.npz", **arrays)
        meta = {
            "step": int(step),
            "paths": [v.path for v in variables],
            "dtypes": [str(v.dtype) for v in variables],
            "sha256": _sha256(tmp / "state.npz"),
            "backend": keras.backend.backend(),
            **(extra or {}),
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
        for name in ("state.npz", "meta.json"):
            _fsync(tmp / name)
        final = self.path(step)
        if final.exists():  # a rerun reaching the same step replaces it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.directory)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def _read(self, step, variables):
        path = self.path(step)
        if not (path / "state.npz").exists() and (path / "state").is_dir():
            # Written by a multi-process run (Orbax): resuming on one process.
            from keras_vitscale.training import orbax_checkpoint

            return orbax_checkpoint.read(path, variables)
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
                values = [data[f"v{i}"] for i in range(len(variables))]
        except Exception as err:  # zip/npy errors come in many types
            raise ValueError(f"state.npz unreadable ({type(err).__name__}: {err})") from None
        for v, value in zip(variables, values):
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(f"{v.path} has shape {value.shape}, model wants {tuple(v.shape)}")
        return meta, values

    def restore_latest(self, model, optimizer, step=None):
        """Restores the newest valid checkpoint; returns its meta dict or None.

        A corrupt checkpoint is reported and the previous one tried. If
        checkpoints exist but none is valid, raises `CheckpointError` rather
        than silently starting from scratch.

        Args:
            model, optimizer: whose variables are restored.
            step: restore exactly this step's checkpoint (a branch point);
                a missing or corrupt one is a `CheckpointError`.
        """
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"{self.directory} has no checkpoint at step {step}; it has "
                    f"{steps or 'none'}.")
            steps = [step]
        variables = self._variables(model, optimizer)
        problems = []
        for step in reversed(steps):
            try:
                meta, values = self._read(step, variables)
            except ValueError as err:
                problems.append(f"{self.path(step)}: {err}")
                self.log(f"WARNING: checkpoint {self.path(step)} is corrupt ({err}); "
                         "skipping it and trying the previous one.")
                continue
            for v, value in zip(variables, values):
                v.assign(value)  # Variable.assign casts to the variable's dtype
            return meta
        if problems:
            raise CheckpointError(
                "Every checkpoint in the workdir is corrupt, so the run cannot resume:\n  "
                + "\n  ".join(problems)
                + "\nMove the checkpoints directory away to restart from step 0, or use "
                "a new --workdir.")
        return None
