"""Keras callbacks of a run: progress, metrics.jsonl, checkpoints, NaN stop.

`fit` runs "epochs" of `log_every` steps; each epoch end is a logging step,
and may be a checkpoint or evaluation step. Steps count from 1 (the step
just finished), matching `optimizer.iterations` after it.
"""

import math
import time

import keras

from keras_vitscale.training import run_log
from keras_vitscale.training.errors import NonFiniteLossError


class RunMonitor(keras.callbacks.Callback):
    """Stops on a non-finite loss (naming the step), logs, checkpoints.

    Args:
        config: the resolved run config.
        start_step: the step the run resumes from.
        schedule: the learning-rate schedule (logged per step).
        manager: a `CheckpointManager`.
        metrics_path: where metrics.jsonl lines are appended (None: not
            written, as on the non-chief processes of a multi-process run).
        progress: show a progress bar.
        row_sinks: functions called with each metrics row (e.g. W&B).
        student: the model whose variables are checkpointed, when `fit`
            trains a wrapper around it (distillation); default: the fit model.
    """

    def __init__(self, config, start_step, schedule, manager, metrics_path, progress=True,
                 row_sinks=(), student=None):
        super().__init__()
        self.row_sinks = tuple(row_sinks)
        self.student = student
        self.config = config
        self.step = start_step
        self.schedule = schedule
        self.manager = manager
        self.metrics_path = metrics_path
        self.last_row = None
        self.last_checkpoint = None
        steps = manager.steps()
        if steps:
            self.last_checkpoint = str(manager.path(steps[-1]))
        self.bar = None
        if progress:
            self.bar = keras.utils.Progbar(config["steps"], unit_name="step",
                                           stateful_metrics=["loss"])
            self.bar.update(start_step)
        # Redraw about 100 times per run: a redraw per step floods logs.
        self.bar_every = max(1, config["steps"] // 100)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.epoch_first_step = self.step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        # The logged loss is the running mean over this logging interval, so
        # it turns non-finite exactly at the first bad step.
        loss = float(keras.ops.convert_to_numpy(logs["loss"]))
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.step, loss, self.last_checkpoint)
        if self.bar is not None and (self.step % self.bar_every == 0
                                     or self.step == self.config["steps"]):
            self.bar.update(self.step, [("loss", loss)])

    def on_epoch_end(self, epoch, logs=None):
        logs_in, logs = logs, dict(logs or {})
        seconds = time.perf_counter() - self.epoch_start
        steps = self.step - self.epoch_first_step
        row = {"step": self.step,
               "learning_rate": float(keras.ops.convert_to_numpy(self.schedule(self.step - 1))),
               "images_per_s": round(steps * self.config["batch_size"] / max(seconds, 1e-9), 2)}
        for key, value in logs.items():
            row[key] = float(keras.ops.convert_to_numpy(value))
        self.last_row = row
        if self.metrics_path is not None:
            run_log.append_metrics(self.metrics_path, row)
        # Later callbacks (TensorBoard) see the same logs dict: give them
        # the throughput too.
        if logs_in is not None:
            logs_in["images_per_s"] = row["images_per_s"]
        for sink in self.row_sinks:
            sink(row)
        if self.step % self.config["checkpoint_every"] == 0 or self.step >= self.config["steps"]:
            self.save()

    def save(self):
        extra = {"data_position": self.step * self.config["batch_size"],
                 "seed": self.config["seed"],
                 "rng": "stateless per (seed, example position); model seed "
                        "generator states are stored with the model variables"}
        try:
            path = self.manager.save(self.step, self.student or self.model,
                                     self.model.optimizer, extra)
        except ValueError as err:  # non-finite parameters: never checkpoint them
            raise NonFiniteLossError(self.step, str(err), self.last_checkpoint,
                                     what="parameters") from None
        self.last_checkpoint = str(path)
