"""A run's full configuration: recipe defaults, then explicit settings.

The resolved config is plain data (a dict), written to WORKDIR/config.json.
It holds every setting plus the model's full `ViTConfig`, enough to rerun.
Restarting in a workdir compares configs; settings that do not change the
trained weights (how often to log, checkpoint, evaluate) may differ.
"""

import math

from keras_vitscale.config import ViTConfig
from keras_vitscale.training import recipes

OPTIMIZERS = ("adafactor", "adam", "shampoo")
LOSSES = ("softmax", "sigmoid")
# Settings that may change between a run and its resumption.
RESUMABLE_CHANGES = ("checkpoint_every", "keep_checkpoints", "eval_every", "fewshot",
                     "progress", "workdir", "data_dir", "tpu", "tensorboard", "wandb")
MODEL_KEYS = ("width", "depth", "mlp_dim", "num_heads", "pooling", "posemb", "block",
              "patch_size")


def resolve(settings):
    """Recipe defaults updated by the explicit settings (None = not given).

    Args:
        settings: dict of explicit settings, e.g. parsed flags; None values
            are ignored. "recipe" picks the defaults (see `recipes.RECIPES`).

    Returns:
        (config dict, set of keys set explicitly or by the recipe).

    Example:
    ```python
    config, explicit = resolve({"recipe": "scaling_vit", "steps": 200})
    config["optimizer"], config["warmup_steps"]  # "adafactor", 2
    ```
    """
    given = {k: v for k, v in settings.items() if v is not None}
    recipe = given.get("recipe", "default")
    config = {"recipe": recipe, **recipes.recipe_defaults(recipe), **given}
    explicit = set(given) | set(recipes.RECIPES[recipe])
    steps = config["steps"]
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a positive integer; got {steps!r}.")
    for name in ("warmup", "cooldown"):
        fraction = config.pop(f"{name}_fraction")
        if config.get(f"{name}_steps") is None:
            config[f"{name}_steps"] = int(round(fraction * steps))
    if config["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config['optimizer']!r}; use one of "
                         f"{', '.join(OPTIMIZERS)}.")
    if config["loss"] not in LOSSES:
        raise ValueError(f"Unknown loss {config['loss']!r}; use softmax or sigmoid.")
    if not 0.0 <= config["label_smoothing"] < 1.0:
        raise ValueError(f"--label-smoothing {config['label_smoothing']} must be in [0, 1).")
    if config["fewshot"] == "auto":
        config["fewshot"] = "1,5,10" if config["dataset"] == "digits" else "none"
    for name in ("checkpoint_every", "eval_every", "log_every", "batch_size",
                 "keep_checkpoints"):
        if int(config[name]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {config[name]}.")
    log_every = config["log_every"] = min(config["log_every"], steps)
    for name in ("checkpoint_every", "eval_every"):
        if config[name] % log_every:
            raise ValueError(
                f"--{name.replace('_', '-')} {config[name]} is not a multiple of "
                f"--log-every {log_every}; checkpoints and evaluations happen at "
                f"logging steps. Use a multiple such as {log_every * max(1, config[name] // log_every)}.")
    if config.get("preset") and "variant" in given:
        raise ValueError("Pass either --preset or --variant, not both.")
    return config, explicit


def head_bias_init(loss, num_classes):
    """Classifier bias init: the paper's -10 for sigmoid at JFT scale
    (>= 1000 classes), else -log(num_classes) so that each sigmoid starts at
    the class prior 1/K (-10 would make a 10-class head learn slowly);
    0 for softmax."""
    if loss != "sigmoid":
        return 0.0
    return -10.0 if num_classes >= 1000 else -math.log(num_classes)


def model_config(config, explicit):
    """The `ViTConfig` of the run, from --preset, --variant or the default."""
    from keras_vitscale import hub, presets

    fields = dict(num_classes=config["num_classes"], image_size=config["image_size"],
                  dropout_rate=config["dropout"],
                  head_bias_init=head_bias_init(config["loss"], config["num_classes"]))
    chosen = {k: config[k] for k in MODEL_KEYS if k in config and
              (k in explicit or not (config.get("preset") or "variant" in explicit))}
    fields.update(chosen)
    preset = config.get("preset")
    if preset:
        if preset in presets.REGISTRY:
            return presets.builtin_config(preset, **fields)
        return presets.read_directory_config(hub.resolve_directory(preset)).replace(**fields)
    return ViTConfig.from_variant(config["variant"], **fields)


def differences(old, new):
    """Human-readable differences between two resolved configs, ignoring
    `RESUMABLE_CHANGES`."""
    keys = sorted((set(old) | set(new)) - set(RESUMABLE_CHANGES))
    return [f"{k}: workdir has {old.get(k)!r}, this run has {new.get(k)!r}"
            for k in keys if old.get(k) != new.get(k)]
