"""Experiment trackers of a run: TensorBoard (through Keras' callback) and Weights &
Biases (only when installed and asked for).

Both see what metrics.jsonl records at each logging step (loss, accuracy,
learning rate, images/s, and the eval metrics at evaluation steps), with the
optimizer step as the x-axis, and the few-shot table at the end.
"""

import hashlib
import importlib
import importlib.util

import keras


class StepTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback with optimizer steps as the x-axis.

    The trainer's `fit` epochs are logging intervals of `log_every` steps,
    so epoch e ends at step (e + 1) * log_every.

    Args:
        log_dir: where the event files go (train/ and validation/ inside).
        log_every: steps per `fit` epoch.

    Example:
    ```python
    callback = StepTensorBoard("runs/digits/tensorboard", log_every=20)
    ```
    """

    def __init__(self, log_dir, log_every):
        super().__init__(log_dir=str(log_dir), update_freq="epoch", write_graph=False)
        self.log_every = int(log_every)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end((epoch + 1) * self.log_every, logs)

    def log_fewshot(self, result, step):
        """Writes the few-shot accuracies (scalars) and table (text) next to
        the validation metrics (Keras closes its own writers when `fit` ends)."""
        import tensorflow as tf

        writer = tf.summary.create_file_writer(f"{self.log_dir}/validation")
        with writer.as_default():
            for shots, accuracy in result.mean.items():
                tf.summary.scalar(f"fewshot/{shots}shot_accuracy", accuracy, step=step)
            tf.summary.text("fewshot/table", f"```\n{result.table()}\n```", step=step)
        writer.close()


class WandbLogger:
    """Logs each metrics.jsonl row, and the few-shot table, to a W&B run.

    The run id is derived from the workdir, so a resumed run continues the
    same W&B run.

    Args:
        project: the W&B project.
        config: the resolved run config (logged as the run's config).
        workdir: the run directory (W&B's files go under it).

    Example:
    ```python
    logger = WandbLogger("keras_vitscale", config, "runs/digits")
    logger.log_row({"step": 20, "loss": 1.2})
    logger.finish()
    ```
    """

    def __init__(self, project, config, workdir):
        wandb = require_wandb()
        run_id = hashlib.sha1(str(workdir).encode()).hexdigest()[:16]
        self.run = wandb.init(project=project, config=config, dir=str(workdir), id=run_id,
                              resume="allow")

    def log_row(self, row):
        """Logs one metrics.jsonl row (its "step" is the x-axis)."""
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_fewshot(self, result, step):
        if self.run is not None:
            self.run.log({f"fewshot/{k}shot_accuracy": v for k, v in result.mean.items()},
                         step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def require_tensorboard():
    """Fails clearly when tf.summary cannot write (TensorFlow's pip package
    does not bring TensorBoard)."""
    missing = [name for name in ("tensorflow", "tensorboard")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"--tensorboard needs {' and '.join(missing)}, not installed: "
                         "`pip install keras-vitscale[logging]` (or `pip install "
                         "tensorboard`), or drop --tensorboard.")


def require_wandb():
    """The wandb module, or a clear error saying how to get it."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ValueError("--wandb needs the wandb package, which is not installed: "
                         "`pip install wandb` (and `wandb login`), or drop --wandb.") from None


class RunLoggers:
    """The run's optional loggers, as the trainer uses them.

    Attributes:
        callbacks: Keras callbacks for `fit` (after the trainer's monitor).
        row_sinks: functions taking each metrics.jsonl row.
    """

    def __init__(self, tensorboard=None, wandb=None):
        self.tensorboard, self.wandb = tensorboard, wandb
        self.callbacks = [tensorboard] if tensorboard else []
        self.row_sinks = [wandb.log_row] if wandb else []

    def log_fewshot(self, result, step):
        for logger in (self.tensorboard, self.wandb):
            if logger is not None:
                logger.log_fewshot(result, step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def create(config, workdir):
    """The loggers asked for by --tensorboard and --wandb [PROJECT].

    Example:
    ```python
    loggers = create({"tensorboard": True, "wandb": None, "log_every": 20}, "runs/x")
    ```
    """
    tensorboard = wandb = None
    if config.get("tensorboard"):
        tensorboard = StepTensorBoard(f"{workdir}/tensorboard", config["log_every"])
    if config.get("wandb"):
        wandb = WandbLogger(config["wandb"], config, workdir)
    return RunLoggers(tensorboard, wandb)


def check_available(config):
    """Before any work: the packages the asked-for loggers need are there."""
    if config.get("tensorboard"):
        require_tensorboard()
    if config.get("wandb"):
        require_wandb()
