"""`train(settings)`: the kind of run the settings ask for.

A plain pretraining run (`trainer.train`), a cooldown branch when
"branch_from" is set (`branch.train`) or a distillation when "teacher" is
set (`distill.train`). The tools call those entry points directly; this is
the library's one call for any of them.
"""

from keras_vitscale.training import branch
from keras_vitscale.training import distill
from keras_vitscale.training import trainer


def train(settings, log=None, progress=True):
    """Runs (or resumes) the run `settings` describe; returns its summary.

    Args:
        settings: explicit settings (None = not given); see
            `tools/pretrain.py --help` and `tools/distill.py --help`.
        log: a function taking a message (default: print to stdout).
        progress: show a progress bar.

    Returns:
        `trainer.train`'s summary dict.

    Example:
    ```python
    from keras_vitscale.training import train
    summary = train({"workdir": "runs/digits"})    # the embedded digits default
    summary["val_accuracy"]
    ```
    """
    if settings.get("branch_from"):
        return branch.train(settings, log=log, progress=progress)
    if settings.get("teacher"):
        return distill.train(settings, log=log, progress=progress)
    return trainer.train(settings, log=log, progress=progress)
