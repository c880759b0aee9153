"""Transfer a pretrained ViT to a dataset: the Scaling ViT fine-tuning recipe.

Zhai et al. (2021) fine-tune with SGD (momentum 0.9), no weight decay, global
gradient-norm clipping at 1.0, a cosine schedule with linear warmup and a
fresh zero-initialised head, usually at a higher resolution than
pretraining (the learned position embedding is resampled to the new grid).
Options: FlexiViT's PI-resize of the patch size, and a linear probe (only
the head trains).
"""

import math
import time
from pathlib import Path

import keras
import numpy as np

from keras_vitscale import data
from keras_vitscale import schedules
from keras_vitscale.model import ViT
from keras_vitscale.training import run_log
from keras_vitscale.training.errors import NonFiniteLossError


def load_for_transfer(handle, num_classes, image_size=None, resample="linear",
                      resize_patch=None):
    """Loads a preset for transfer: new resolution and patch size, zero head.

    Args:
        handle: a built-in preset name, preset directory or "hf://org/repo".
        num_classes: classes of the new task.
        image_size: new square resolution (default: the preset's).
        resample: "linear" or "bicubic" position-embedding resampling.
        resize_patch: new patch size (FlexiViT PI-resize), or None.

    Returns:
        A `kvs.ViT` whose head kernel and bias are zero.

    Example:
    ```python
    model = load_for_transfer("runs/digits/model", 10, image_size=48)
    ```
    """
    if resize_patch:
        from keras_vitscale.layers.flexi import resize_patch as pi_resize

        # Load at the preset's own resolution: the new image size need only be
        # divisible by the new patch size, not the old one.
        model = ViT.from_preset(handle, num_classes=num_classes)
        model = pi_resize(model, resize_patch, image_size=image_size, resample=resample)
    else:
        model = ViT.from_preset(handle, num_classes=num_classes, image_size=image_size,
                                resample=resample)
    # The recipe always starts from a zero head, also when the class count
    # happens to equal the pretraining one (the old head would be loaded).
    for variable in model.get_layer("head").weights:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    return model


def freeze_all_but_head(model):
    """Linear probe: only the layer named "head" stays trainable."""
    for layer in model.layers:
        layer.trainable = layer.name == "head"


class _MetricsLog(keras.callbacks.Callback):
    """Appends one metrics.jsonl row per `fit` epoch; stops on a NaN loss."""

    def __init__(self, path, schedule, log_every):
        super().__init__()
        self.path, self.schedule, self.log_every = path, schedule, log_every

    def on_train_batch_end(self, batch, logs=None):
        loss = float(keras.ops.convert_to_numpy(logs["loss"]))
        if not math.isfinite(loss):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            raise NonFiniteLossError(step, loss, None)

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.log_every
        row = {"step": step,
               "learning_rate": float(keras.ops.convert_to_numpy(self.schedule(step - 1)))}
        row.update({k: float(keras.ops.convert_to_numpy(v)) for k, v in (logs or {}).items()})
        run_log.append_metrics(self.path, row)


def finetune(handle, workdir, dataset="digits", data_dir=None, image_size=None,
             resample="linear", resize_patch=None, linear_probe=False, steps=500,
             batch_size=128, lr=0.01, warmup_steps=None, seed=0, log=None):
    """Fine-tunes a preset on a dataset with `model.fit`; returns a summary.

    Args:
        handle: a built-in preset name, preset directory or "hf://org/repo".
        workdir: output directory: model/ (the fine-tuned preset) and
            metrics.jsonl.
        dataset: "digits", "synthetic", "folder:PATH" or "tfds:NAME[:SPLIT]".
        data_dir: TFDS data directory.
        image_size: square fine-tuning resolution (default: the preset's).
        resample: "linear" or "bicubic" position-embedding resampling.
        resize_patch: new patch size (FlexiViT PI-resize), or None.
        linear_probe: train only the head.
        steps, batch_size, lr: SGD steps, batch and peak learning rate.
        warmup_steps: linear warmup (default 5% of `steps`).
        seed: seed of the data order and crops.
        log: a function taking a message (default: print).

    Returns:
        {"val_accuracy", "val_loss", "steps", "seconds", "model" (the
        fine-tuned `kvs.ViT`)}.

    Example:
    ```python
    from keras_vitscale.training.finetune import finetune
    summary = finetune("runs/digits/model", "runs/digits_ft48", image_size=48, steps=200)
    summary["val_accuracy"]
    ```
    """
    log = log or (lambda msg: print(msg, flush=True))
    started = time.perf_counter()
    if steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1.")
    warmup = round(0.05 * steps) if warmup_steps is None else int(warmup_steps)
    if not 0 <= warmup < steps:
        raise ValueError(f"--warmup-steps {warmup} must be in [0, --steps {steps}).")
    if resample not in ("linear", "bicubic"):
        raise ValueError(f"Unknown --resample {resample!r}; use linear or bicubic.")
    workdir = Path(workdir).expanduser()
    keras.utils.set_random_seed(seed)
    size = None if image_size is None else (int(image_size),) * 2
    source = data.load_source(dataset, data_dir, image_size=size or (32, 32))
    model = load_for_transfer(handle, source.num_classes, image_size=size,
                              resample=resample, resize_patch=resize_patch)
    size = model.config.image_size
    if linear_probe:
        freeze_all_but_head(model)
    schedule = schedules.create("cosine", lr, steps, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9, global_clipnorm=1.0),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])

    # fit "epochs" are logging intervals; gcd keeps them a whole number.
    log_every = math.gcd(steps, 10)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / run_log.METRICS_FILE
    metrics_path.unlink(missing_ok=True)
    train_ds = data.train_dataset(source, batch_size, size, seed)
    eval_ds = data.eval_dataset(source, batch_size, size)
    log(f"Fine-tuning {'the head of ' if linear_probe else ''}"
        f"{model.config.variant or 'ViT'} (patch {model.config.patch_size}, "
        f"{size[0]}x{size[1]}) on {source.name}: {steps} steps of batch {batch_size}, "
        f"SGD lr {lr}, backend {keras.backend.backend()}")
    epochs = steps // log_every
    model.fit(train_ds, epochs=epochs, steps_per_epoch=log_every, validation_data=eval_ds,
              validation_freq=[epochs], callbacks=[_MetricsLog(metrics_path, schedule, log_every)],
              shuffle=False, verbose=0)  # the stream is already shuffled, seeded
    final = run_log.read_metrics(metrics_path)[-1]
    model.save_to_preset(str(workdir / "model"), metadata={"finetuning": {
        "from": str(handle), "dataset": dataset, "steps": steps, "batch_size": batch_size,
        "lr": lr, "warmup_steps": warmup, "linear_probe": bool(linear_probe),
        "resize_patch": resize_patch, "resample": resample, "seed": seed}})
    return {"val_accuracy": final["val_accuracy"], "val_loss": final["val_loss"],
            "steps": steps, "seconds": round(time.perf_counter() - started, 1), "model": model}
