"""Atomic, self-checking checkpoints of a run: model variables, optimizer
state, step, data position and RNG state, behind one manager.

`CheckpointManager` owns what every format shares: the directory layout
(WORKDIR/checkpoints/ckpt_00001000/), the list of steps, keeping the newest
`keep`, refusing to save non-finite parameters, and restoring the newest
checkpoint that reads back (a corrupt one is reported and skipped for the
previous one). The formats are sibling modules that know nothing of it:
- `npz_checkpoint.py`: one process; state.npz + meta.json with a SHA-256,
  backend-neutral.
- `orbax_checkpoint.py`: several JAX processes, whose sharded variables
  cannot be gathered into one file.
The manager writes in the format of the run's process count and reads each
checkpoint in the format it finds, so a run resumes on any process count.
"""

import shutil
import sys
from pathlib import Path

import keras

from keras_vitscale.training import npz_checkpoint
from keras_vitscale.training import orbax_checkpoint
from keras_vitscale.training.errors import CheckpointError

PREFIX = "ckpt_"


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
    return CheckpointManager(workdir, keep=keep, log=log, process_count=process_count)


def _format_of(path):
    """The format module of the checkpoint directory `path`."""
    return orbax_checkpoint if orbax_checkpoint.matches(path) else npz_checkpoint


class CheckpointManager:
    """Saves and restores training state in `workdir/checkpoints`.

    Args:
        workdir: the run directory.
        keep: how many of the newest checkpoints to keep.
        log: where reports go (default: stderr).
        process_count: processes in the run: 1 writes the one-process
            format (`npz_checkpoint`), more write Orbax's; every process
            then calls `save` and `restore_latest`. Either reads both.

    Example:
    ```python
    manager = CheckpointManager("runs/digits", keep=3)
    manager.save(100, model, optimizer, extra={"data_position": 6400})
    meta = manager.restore_latest(model, optimizer)  # None if no checkpoint
    ```
    """

    def __init__(self, workdir, keep=3, log=None, process_count=1):
        self.directory = Path(workdir) / "checkpoints"
        self.keep = max(1, int(keep))
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.format = orbax_checkpoint if process_count > 1 else npz_checkpoint

    @classmethod
    def for_run(cls, workdir, keep=3, process_count=1, log=None):
        """`manager_for`: the one-process format for one process, Orbax for several."""
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

        Args:
            step: the training step.
            model, optimizer: whose variables are saved.
            extra: more JSON-able meta (data position, seed, ...).

        Returns:
            The checkpoint directory.

        Raises:
            ValueError: a parameter is non-finite (a checkpoint that would
                poison every resume is never written).
        """
        variables = self._variables(model, optimizer)
        values = self.format.values(variables)
        for v, finite in zip(variables, self.format.all_finite(values), strict=True):
            if not finite:
                raise ValueError(f"variable {v.path} is non-finite at step {step}")
        meta = {"step": int(step), "paths": [v.path for v in variables],
                "dtypes": [str(v.dtype) for v in variables],
                "backend": keras.backend.backend(), **(extra or {})}
        # resolve(): the checkpoints directory may be a link to storage that
        # all hosts share, made before the first checkpoint exists.
        self.directory.resolve().mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        self.format.save(final, values, meta)
        if self.format.is_primary():
            for old in self.steps()[:-self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def _read(self, step, variables):
        path = self.path(step)
        return _format_of(path).read(path, variables)

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
