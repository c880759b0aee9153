"""`train(settings)`: one pretraining run around `model.fit`, resumable.

One straight path: settings -> devices -> data -> model -> optimizer ->
restore -> fit -> save (the preset, curves.png and few-shot results).
Everything lands in the workdir (see `tools/pretrain.py --help`). A run
that starts elsewhere or trains something around the model supplies what
differs through a `RunSpec`: a cooldown branch (`training/branch.py`) its
settings, starting checkpoint and the parent's metrics rows; a distillation
(`training/distill.py`) a check of its teacher and the wrapped model `fit`
trains.
"""

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable
from typing import Optional

import keras

from keras_vitscale import data
from keras_vitscale import presets, pretrained
from keras_vitscale.evaluation.on_source import fewshot_on_source
from keras_vitscale.model import ViT
from keras_vitscale.training import devices
from keras_vitscale.training import losses
from keras_vitscale.training import run_log
from keras_vitscale.training import settings as settings_lib
from keras_vitscale.training import trackers
from keras_vitscale.training.callbacks import RunMonitor
from keras_vitscale.training.checkpoint import CheckpointManager
from keras_vitscale.training.errors import RunInterrupted
from keras_vitscale.training.plots import plot_curves
from keras_vitscale.training.settings import build_schedule  # noqa: F401 (public here too)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a kind of run supplies to `train`; the defaults are a plain run.

    Args:
        resolve: settings -> (config, explicit keys); default
            `settings.resolve`.
        model_config: (config, explicit keys) -> the `ViTConfig` to build;
            default `settings.model_config`.
        check: config -> None, raising ValueError; runs after the model's
            config is known and before the workdir is touched.
        wrap: (model, config, log) -> the model `fit` trains (checkpoints,
            the preset and few-shot use the model itself).
        start: (config, model, optimizer, log) -> the step to start from,
            when the run has no checkpoint of its own (default: 0).
        history: config -> metrics rows that precede the run's start (the
            first lines of a new metrics.jsonl).

    Example:
    ```python
    spec = RunSpec(check=lambda config: None)
    train({"workdir": "runs/digits"}, spec=spec)
    ```
    """

    resolve: Callable = settings_lib.resolve
    model_config: Callable = settings_lib.model_config
    check: Optional[Callable] = None
    wrap: Optional[Callable] = None
    start: Optional[Callable] = None
    history: Optional[Callable] = None


def build_optimizer(config, schedule):
    """The run's optimizer with decoupled body/head weight decay on kernels."""
    from keras_vitscale import optimizers

    wd, head = float(config["weight_decay"]), config["head_weight_decay"]
    if head is None:
        multipliers = {r".*kernel": 1.0}
    elif wd > 0:
        # The optimizers take one rate and per-path multipliers: the head's
        # rate is expressed relative to the body's.
        multipliers = {r"head/kernel": float(head) / wd, r".*kernel": 1.0}
    else:
        wd, multipliers = float(head), {r"head/kernel": 1.0}
    kwargs = dict(weight_decay=wd, weight_decay_multipliers=multipliers,
                  global_clipnorm=config["clipnorm"] or None)
    name = config["optimizer"]
    if name == "adafactor":
        return optimizers.ScalingAdafactor(schedule, **kwargs)
    if name == "adam":
        return optimizers.BF16Adam(schedule, **kwargs)
    shampoo = getattr(optimizers, "Shampoo", None)
    if shampoo is None:
        raise ValueError("--optimizer shampoo: kvs.optimizers.Shampoo is not available "
                         "in this version; use adam or adafactor.")
    return shampoo(schedule, **kwargs)


def _check_workdir(workdir, config):
    def foreign(path):
        if (path / "checkpoints").is_dir():
            return ("has checkpoints but no config.json, so it cannot be checked against "
                    "this run")
        return None

    return run_log.check_workdir(workdir, "config.json",
                                 lambda old: settings_lib.differences(old, config),
                                 "a run with a different config", foreign)


def _build_model(config, vit_config):
    model = ViT(config=vit_config, dtype=config["dtype_policy"])
    preset = config.get("preset")
    parsed = presets.parse_handle(preset) if preset else None
    # A bare built-in name is an architecture to train from scratch; a tag
    # (vit_b16.augreg_in21k), a directory or a Hub repo starts from its weights.
    if preset and (parsed is None or parsed.tag or parsed.revision):
        directory = pretrained.resolve_directory(preset, model_class=ViT)
        presets.load_weights_into(model, presets.weights_path(directory),
                                  source_config=presets.read_directory_config(directory))
    return model


def _restore(spec, config, workdir, manager, model, optimizer, resuming, log):
    """Restores the run's newest checkpoint, or asks the spec where a run
    without one starts; returns the step to start from."""
    meta = manager.restore_latest(model, optimizer) if resuming else None
    if meta:
        log(f"Resuming from {manager.path(int(meta['step']))} (step {meta['step']}).")
        return int(meta["step"])
    if spec.start is not None:
        return spec.start(config, model, optimizer, log)
    if resuming:
        log(f"{workdir} has this run's config but no checkpoint yet; starting at step 0.")
    return 0


def _save_final_preset(model, config, directory, chief):
    """WORKDIR/model. In a multi-process JAX run reading the weights is a
    collective, so every process saves; the others into a scratch directory
    they then delete."""
    target = directory if chief else Path(tempfile.mkdtemp(prefix="kvs_preset_"))
    try:
        model.save_to_preset(str(target), metadata={"training": {k: config[k] for k in (
            "recipe", "dataset", "steps", "optimizer", "lr", "schedule", "loss", "seed")}})
    finally:
        if not chief:
            shutil.rmtree(target, ignore_errors=True)


def train(settings, log=None, progress=True, spec=None):
    """Runs (or resumes) a pretraining run; returns a summary dict.

    Args:
        settings: explicit settings (flag names with underscores, None = not
            given); "workdir" is required. See `tools/pretrain.py --help`.
        log: a function taking a message (default: print to stdout).
        progress: show a progress bar.
        spec: a `RunSpec` for a run that is not a plain pretraining run
            (`branch.train` and `distill.train` pass theirs).

    Returns:
        {"step", "val_accuracy", "val_loss", "fewshot" (a FewShotResult or
        None), "fewshot_dataset" (the source it is on), "seconds",
        "resumed_from"}.

    Raises:
        ValueError: bad settings, named, before anything is written.
        IncompatibleWorkdirError: the workdir holds a different run.
        NonFiniteLossError: the loss became NaN/inf (the step is named).
        CheckpointError: checkpoints exist but none can be restored.

    Example:
    ```python
    from keras_vitscale.training import train
    summary = train({"workdir": "runs/digits"})    # the embedded digits default
    summary["val_accuracy"]
    ```
    """
    spec = spec or RunSpec()
    log = log or (lambda msg: print(msg, flush=True))
    started = time.perf_counter()
    # Settings: every one is checked before anything is written.
    config, explicit = spec.resolve(settings)
    if not config.get("workdir"):
        raise ValueError("--workdir is required: every run writes its config, "
                         "checkpoints and metrics there.")
    workdir = Path(config["workdir"]).expanduser()
    size = (int(config["image_size"]),) * 2
    data.parse_augment(config["augment"])
    trackers.check_available(config)
    # Devices. In a multi-process run every process trains, evaluates and
    # checkpoints (Orbax coordinates); only process 0 writes the workdir's
    # other files.
    process_index, process_count = devices.process_info()
    chief = process_index == 0
    # The strategy scope (TF) is where model and optimizer variables must be
    # made; JAX's distribution is global and its scope is a no-op.
    scope = devices.setup(config["mesh"], config["batch_size"], tpu=config["tpu"])
    # Data, and the model it fixes (the number of classes).
    source = data.load_source(config["dataset"], config["data_dir"],
                              num_classes=config.get("num_classes"), image_size=size)
    config["num_classes"] = source.num_classes
    shots = settings_lib.parse_fewshot(config["fewshot"])
    downstream = source
    if shots and config["fewshot_dataset"] != config["dataset"]:
        downstream = data.load_source(config["fewshot_dataset"], config["data_dir"],
                                      image_size=size)
    vit_config = spec.model_config(config, explicit)
    settings_lib.record_model(config, vit_config)
    if spec.check is not None:
        spec.check(config)
    resuming = _check_workdir(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resuming and chief:
        run_log.write_json_atomic(workdir / "config.json", config)

    keras.utils.set_random_seed(config["seed"])
    with scope:
        model = _build_model(config, vit_config)
        devices.check_model_parallel(model, config["mesh"])
        schedule = build_schedule(config)
        optimizer = build_optimizer(config, schedule)
        fit_model = spec.wrap(model, config, log) if spec.wrap is not None else model
        fit_model.compile(optimizer=optimizer, loss=losses.get(config["loss"]),
                          # weighted: padded eval examples (weight 0) are not counted
                          weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        optimizer.build(fit_model.trainable_variables)
        manager = CheckpointManager.for_run(workdir, config["keep_checkpoints"], process_count)
        start = _restore(spec, config, workdir, manager, model, optimizer, resuming, log)
    metrics_path = workdir / run_log.METRICS_FILE
    if chief:
        if spec.history is not None and not metrics_path.exists():
            run_log.write_metrics(metrics_path, spec.history(config))
        run_log.trim_metrics(metrics_path, start)

    steps, log_every = config["steps"], config["log_every"]
    train_ds = data.train_dataset(
        source, config["batch_size"], size, config["seed"], start_step=start,
        crop=config["train_crop"], flip=config["flip"], augment=config["augment"],
        label_smoothing=config["label_smoothing"], process_index=process_index,
        process_count=process_count)
    eval_ds = data.eval_dataset(source, config["batch_size"], size,
                                pad_to_batch=bool(config["mesh"]) or process_count > 1,
                                process_index=process_index, process_count=process_count)
    epochs = steps // log_every
    eval_epochs = [e for e in range(start // log_every + 1, epochs + 1)
                   if (e * log_every) % config["eval_every"] == 0 or e == epochs]
    loggers = trackers.create(config, workdir) if chief else trackers.RunLoggers()
    monitor = RunMonitor(config, start, schedule, manager, metrics_path if chief else None,
                         progress=progress and chief, row_sinks=loggers.row_sinks,
                         student=model)
    if start < steps:
        log(f"Training {config['model']['variant'] or 'ViT'} ({vit_config.count_params():,} "
            f"params) on {source.name}: steps {start}->{steps}, batch "
            f"{config['batch_size']}, backend {keras.backend.backend()}, workdir {workdir}")
        try:
            fit_model.fit(train_ds, epochs=epochs, initial_epoch=start // log_every,
                          steps_per_epoch=log_every, validation_data=eval_ds,
                          validation_freq=eval_epochs or 1,
                          callbacks=[monitor, *loggers.callbacks], verbose=0)
        except KeyboardInterrupt as interrupt:  # Ctrl-C: say where the run stands
            raise RunInterrupted(monitor.step, monitor.last_checkpoint) from interrupt
        final = monitor.last_row
    else:
        final = {"step": start, **{f"val_{k}": float(v) for k, v in fit_model.evaluate(
            eval_ds, verbose=0, return_dict=True).items()}}
    # Save.
    _save_final_preset(model, config, workdir / "model", chief)
    if chief:
        plot_curves(metrics_path, workdir / "curves.png")
    summary = {"step": final["step"], "val_accuracy": final.get("val_accuracy"),
               "val_loss": final.get("val_loss"), "resumed_from": start if resuming else None,
               "fewshot": None, "fewshot_dataset": None}
    if shots:
        result = fewshot_on_source(model, downstream, size, shots)
        summary["fewshot"], summary["fewshot_dataset"] = result, config["fewshot_dataset"]
        if chief:
            run_log.write_json_atomic(workdir / "fewshot.json", {
                "dataset": config["fewshot_dataset"],
                **{str(k): v for k, v in result.mean.items()}})
            loggers.log_fewshot(result, final["step"])
    loggers.finish()
    devices.wait_for_all_processes("keras_vitscale.train:end")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary
