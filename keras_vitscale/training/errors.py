"""The errors a training run stops with; each names what went wrong and the fix."""

import sys


class TrainingError(RuntimeError):
    """Base class: a run that cannot start or must stop."""


class NonFiniteLossError(TrainingError):
    """The loss (or the parameters) became NaN/inf at `step`.

    Args:
        step: the 1-based step whose loss was non-finite.
        value: the offending value.
        checkpoint: the last good checkpoint kept on disk, or None.
    """

    def __init__(self, step, value, checkpoint=None, what="loss"):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        kept = (f"the last good checkpoint is kept at {checkpoint}"
                if checkpoint else "no checkpoint had been written yet")
        super().__init__(
            f"Non-finite {what} at step {step} ({value}); training stopped and "
            f"{kept}. Lower --lr, raise --warmup-steps or use --dtype-policy "
            "float32, then rerun the same command to resume from that checkpoint.")


class IncompatibleWorkdirError(TrainingError):
    """The workdir holds a run whose config differs from this one."""


class CheckpointError(TrainingError):
    """No checkpoint in the workdir could be restored."""


def report(err):
    """Prints an error that stopped a tool's run; returns the tool's exit
    status: 3 for a non-finite loss, 2 for bad settings and other stops."""
    print(f"\nERROR: {err}", file=sys.stderr, flush=True)
    return 3 if isinstance(err, NonFiniteLossError) else 2
