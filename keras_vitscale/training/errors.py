"""The errors a training run stops with; each names what went wrong and the fix."""


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



class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run's training at `step`; a KeyboardInterrupt still,
    so code that catches those keeps working.

    Args:
        step: the last step the run reached (finished).
        checkpoint: the last checkpoint on disk (where a rerun resumes), or
            None.
    """

    def __init__(self, step, checkpoint=None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}")
