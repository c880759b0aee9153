"""`train(settings)`: one pretraining run around `model.fit`, resumable.

Order of work: resolve the config, check the workdir, set up the device
mesh, build data, model and optimizer, restore the newest valid checkpoint,
`fit` the remaining steps, then write the preset, curves.png and few-shot
results. Everything lands in the workdir (see `tools/pretrain.py --help`).
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import keras

from keras_vitscale import data
from keras_vitscale import schedules
from keras_vitscale.model import ViT
from keras_vitscale.config import ViTConfig
from keras_vitscale.training import branch
from keras_vitscale.training import config as config_lib
from keras_vitscale.training import devices
from keras_vitscale.training import losses
from keras_vitscale.training import run_logging
from keras_vitscale.training.callbacks import RunMonitor
from keras_vitscale.training.checkpoint import CheckpointManager
from keras_vitscale.training.errors import IncompatibleWorkdirError
from keras_vitscale.training.plots import plot_curves


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


def build_schedule(config):
    extra = {"timescale": config["rsqrt_timescale"]} if config["schedule"] == "rsqrt" else {}
    return schedules.create(config["schedule"], config["lr"], config["steps"],
                            warmup_steps=config["warmup_steps"],
                            cooldown_steps=config["cooldown_steps"], **extra)


def _write_json_atomic(path, value):
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _check_workdir(workdir, config):
    path = workdir / "config.json"
    if not path.exists():
        if (workdir / "checkpoints").is_dir():
            raise IncompatibleWorkdirError(
                f"{workdir} has checkpoints but no config.json, so it cannot be checked "
                "against this run; use a new --workdir.")
        return False
    with open(path) as f:
        old = json.load(f)
    diffs = config_lib.differences(old, config)
    if diffs:
        raise IncompatibleWorkdirError(
            f"--workdir {workdir} holds a run with a different config; refusing to "
            "overwrite it. Differences:\n  " + "\n  ".join(diffs)
            + "\nRerun with the same settings to resume it, or choose a new --workdir.")
    return True


def _trim_metrics(path, step):
    """Drops metrics logged after `step` (the run died after its checkpoint)."""
    if not path.exists():
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def _build_model(config, vit_config):
    from keras_vitscale import hub, presets

    model = ViT(config=vit_config, dtype=config["dtype_policy"])
    preset = config.get("preset")
    if preset and preset not in presets.REGISTRY:  # a preset dir: start from its weights
        directory = hub.resolve_directory(preset)
        presets.load_weights_into(model, presets.weights_path(directory),
                                  source_config=presets.read_directory_config(directory))
    return model


def _restore(config, workdir, manager, model, optimizer, resuming, log):
    """Restores the run's newest checkpoint, or a branch's parent checkpoint
    when the branch has none of its own; returns the step to start from."""
    meta = manager.restore_latest(model, optimizer) if resuming else None
    if meta:
        log(f"Resuming from {manager.path(int(meta['step']))} (step {meta['step']}).")
        return int(meta["step"])
    if "branch" in config:
        parent, step = config["branch"]["parent"], config["branch"]["step"]
        CheckpointManager(parent).restore_latest(model, optimizer, step=step)
        log(f"Branching from {parent} at step {step}: cooldown to 0 over "
            f"{config['cooldown_steps']} steps, ending at step {config['steps']}.")
        return step
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


def fewshot_on_source(model, source, image_size, shots=(1, 5, 10), seeds=3, l2_reg=2.0**10,
                      progress=False):
    """Few-shot linear evaluation of a classifier's pre-logits features.

    The few-shot train examples come from the source's training split, the
    test examples from its held-out split.

    Args:
        model: a `kvs.ViT` (its head's input is the feature).
        source: a `kvs.data.Source`.
        image_size: (h, w) of the model.
        shots, seeds, l2_reg: see `kvs.evaluation.fewshot`.
        progress: progress bars over feature extraction.

    Returns:
        A `FewShotResult`.
    """
    from keras_vitscale import evaluation

    features = model
    if model.config.num_classes:
        features = keras.Model(model.inputs, model.get_layer("head").input)
    train = data.eval_dataset(source, 256, image_size, one_hot=False, split=source.train)
    test = data.eval_dataset(source, 256, image_size, one_hot=False)
    x_train, y_train = evaluation.extract_features(features, train, progress=progress)
    x_test, y_test = evaluation.extract_features(features, test, progress=progress)
    return evaluation.fewshot(x_train, y_train, x_test, y_test, shots=shots, seeds=seeds,
                              l2_reg=l2_reg, num_classes=source.num_classes)


def train(settings, log=None, progress=True):
    """Runs (or resumes) a pretraining run; returns a summary dict.

    Args:
        settings: explicit settings (flag names with underscores, None = not
            given); "workdir" is required. See `tools/pretrain.py --help`.
        log: a function taking a message (default: print to stdout).
        progress: show a progress bar.

    Returns:
        {"step", "val_accuracy", "val_loss", "fewshot" (a FewShotResult or
        None), "seconds", "resumed_from"}.

    Raises:
        ValueError: bad settings, named, before any training.
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
    log = log or (lambda msg: print(msg, flush=True))
    started = time.perf_counter()
    if settings.get("branch_from"):
        config, explicit = branch.resolve(settings)
    else:
        config, explicit = config_lib.resolve(settings)
    if not config.get("workdir"):
        raise ValueError("--workdir is required: every run writes its config, "
                         "checkpoints and metrics there.")
    workdir = Path(config["workdir"]).expanduser()
    if config["steps"] % config["log_every"]:
        raise ValueError(f"--steps {config['steps']} is not a multiple of --log-every "
                         f"{config['log_every']}; use a multiple, e.g. --steps "
                         f"{config['steps'] - config['steps'] % config['log_every']}.")
    size = (int(config["image_size"]),) * 2
    data.parse_augment(config["augment"])  # fail on a bad spec before any work
    run_logging.check_available(config)
    process_index, process_count = devices.process_info()
    # In a multi-process run every process trains, evaluates and
    # checkpoints (Orbax coordinates); only process 0 writes the workdir's
    # other files.
    chief = process_index == 0
    # The strategy scope (TF) is where model and optimizer variables must be
    # made; JAX's distribution is global and its scope is a no-op.
    scope = devices.setup(config["mesh"], config["batch_size"], tpu=config["tpu"])
    source = data.load_source(config["dataset"], config["data_dir"],
                              num_classes=config.get("num_classes"), image_size=size)
    config["num_classes"] = source.num_classes
    if "branch" in config:  # the parent's model, whatever flags made it
        vit_config = ViTConfig.from_dict(config["model"])
    else:
        vit_config = config_lib.model_config(config, explicit)
    config["model"] = vit_config.to_dict()
    if config.get("preset"):
        config["variant"] = None
    if config.get("teacher"):  # a bad teacher fails before the workdir is touched
        from keras_vitscale.training import distill

        distill.check_teacher(config)
    resuming = _check_workdir(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resuming and chief:
        _write_json_atomic(workdir / "config.json", config)

    keras.utils.set_random_seed(config["seed"])
    with scope:
        model = _build_model(config, vit_config)
        devices.check_model_parallel(model, config["mesh"])
        schedule = build_schedule(config)
        optimizer = build_optimizer(config, schedule)
        # What `fit` trains: the model, or a distillation wrapper around it
        # (checkpoints, the preset and few-shot always use the model itself).
        fit_model = model
        if config.get("teacher"):
            from keras_vitscale.training import distill

            fit_model = distill.wrap_for_training(model, config, log=log)
        fit_model.compile(optimizer=optimizer, loss=losses.get(config["loss"]),
                          # weighted: padded eval examples (weight 0) are not counted
                          weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        optimizer.build(fit_model.trainable_variables)
        manager = CheckpointManager.for_run(workdir, config["keep_checkpoints"], process_count)
        start = _restore(config, workdir, manager, model, optimizer, resuming, log)
    metrics_path = workdir / "metrics.jsonl"
    if chief:
        if "branch" in config:
            branch.copy_parent_metrics(config["branch"]["parent"], config["branch"]["step"],
                                       metrics_path)
        _trim_metrics(metrics_path, start)

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
    loggers = run_logging.create(config, workdir) if chief else run_logging.RunLoggers()
    monitor = RunMonitor(config, start, schedule, manager, metrics_path if chief else None,
                         progress=progress and chief, row_sinks=loggers.row_sinks,
                         student=model)
    if start < steps:
        log(f"Training {config['model']['variant'] or 'ViT'} ({vit_config.count_params():,} "
            f"params) on {source.name}: steps {start}->{steps}, batch "
            f"{config['batch_size']}, backend {keras.backend.backend()}, workdir {workdir}")
        fit_model.fit(train_ds, epochs=epochs, initial_epoch=start // log_every,
                      steps_per_epoch=log_every, validation_data=eval_ds,
                      validation_freq=eval_epochs or 1,
                      callbacks=[monitor, *loggers.callbacks], verbose=0)
        final = monitor.last_row
    else:
        final = {"step": start, **{f"val_{k}": float(v) for k, v in fit_model.evaluate(
            eval_ds, verbose=0, return_dict=True).items()}}
    _save_final_preset(model, config, workdir / "model", chief)
    if chief:
        plot_curves(metrics_path, workdir / "curves.png")
    summary = {"step": final["step"], "val_accuracy": final.get("val_accuracy"),
               "val_loss": final.get("val_loss"), "resumed_from": start if resuming else None,
               "fewshot": None}
    if config["fewshot"] != "none":
        shots = [int(s) for s in str(config["fewshot"]).split(",")]
        result = fewshot_on_source(model, source, (config["image_size"],) * 2, shots)
        summary["fewshot"] = result
        if result is not None and chief:
            _write_json_atomic(workdir / "fewshot.json",
                               {str(k): v for k, v in result.mean.items()})
            loggers.log_fewshot(result, final["step"])
    loggers.finish()
    devices.wait_for_all_processes("keras_vitscale.train:end")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary

