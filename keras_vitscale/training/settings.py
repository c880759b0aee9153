"""A run's settings: recipes (named bundles of defaults), then explicit flags.

`BASE` is the embedded default: a small ViT pretrained on the bundled digits
0-5 in a few minutes on a laptop CPU, then judged by few-shot transfer to the
digits 6-9 it never saw (the downstream source, "fewshot_dataset"). A recipe
changes only the training choices; the model and data stay `BASE`'s unless
flags say otherwise, so `--recipe scaling_vit` alone is a quick smoke run.
Warmup and cooldown are given as fractions of the run in a recipe, turned
into steps when the settings are resolved.

The resolved config is plain data (a dict), written to WORKDIR/config.json
only after every setting is checked (`resolve` raises before anything is
written). It holds every setting plus the model's full `ViTConfig`, enough
to rerun; its model fields are the built model's (`record_model`).
Restarting in a workdir compares configs; settings that do not change the
trained weights (how often to log, checkpoint, evaluate) may differ.
"""

import math

from keras_vitscale import presets, pretrained
from keras_vitscale import schedules
from keras_vitscale.config import ViTConfig
from keras_vitscale.data.sources import digit_classes
from keras_vitscale.evaluation.on_source import check_shots
from keras_vitscale.model import ViT

BASE = dict(
    # model: used only when neither --preset nor --variant is given (see
    # MODEL_KEYS)
    variant="mu", patch_size=8, width=64, depth=4, mlp_dim=256, num_heads=4,
    pooling="gap", posemb="sincos2d", block="sequential", dropout=0.0,
    image_size=32, dtype_policy="float32",
    # data
    dataset="digits:0-5", data_dir=None, batch_size=64, augment="none", train_crop=None,
    flip=None, label_smoothing=0.0,
    # optimisation
    steps=600, optimizer="adam", lr=2e-3, schedule="cosine",
    warmup_fraction=0.05, cooldown_fraction=0.0, rsqrt_timescale=10_000,
    weight_decay=1e-4, head_weight_decay=None, clipnorm=1.0, loss="softmax",
    # bookkeeping
    seed=0, checkpoint_every=200, keep_checkpoints=3, eval_every=200, log_every=20,
    mesh=None, tpu=None, fewshot="auto", fewshot_dataset=None, tensorboard=False, wandb=None,
    # cooldown branches (see training/branch.py)
    branch_from=None, branch_step=None,
    # distillation (see training/distill.py): teacher preset or workdir
    teacher=None, distill_temperature=1.0, distill_label_weight=0.0,
)

RECIPES = {
    "default": {},
    # Scaling ViT (Zhai et al. 2021): Adafactor variant, decoupled wd 0.03
    # on the body and 3.0 on the head (kernels only), rsqrt with linear
    # warmup and cooldown (10k and 50k of 1M steps in the paper: 1% and 5%),
    # MAP head, sigmoid cross-entropy, global grad-norm clipping at 1.0.
    "scaling_vit": dict(
        optimizer="adafactor", lr=8e-4, schedule="rsqrt", warmup_fraction=0.01,
        cooldown_fraction=0.05, weight_decay=0.03, head_weight_decay=3.0,
        pooling="map", loss="sigmoid", clipnorm=1.0),
    # "Better plain ViT baselines" (Beyer et al. 2022): Adam, cosine,
    # RandAugment level 10, mixup 0.2, GAP head, sincos2d position embedding.
    "simplevit": dict(
        optimizer="adam", lr=1e-3, schedule="cosine", warmup_fraction=0.03,
        weight_decay=1e-4, augment="randaugment:10,mixup:0.2", pooling="gap",
        posemb="sincos2d", loss="softmax"),
    # SimplEsT-ViT (E-SPA + TAT): no normalisation or skips, label smoothing
    # 0.1, dropout, Adam with cosine decay. TAT's activation cannot reach its
    # target kernel in fewer than 7 blocks, so the recipe asks for 8.
    "tat": dict(
        block="vanilla", depth=8, pooling="gap", label_smoothing=0.1, dropout=0.1,
        optimizer="adam", lr=1e-3, schedule="cosine", warmup_fraction=0.05,
        loss="softmax"),
}


# The model settings a --variant (or --preset) takes from itself instead of
# BASE: the variant's own architecture, and its pooling and position
# embedding (ViTConfig's defaults: a class token and a learned embedding).
# A recipe's own model choices (scaling_vit's MAP head) and explicit flags
# still apply on top.
MODEL_KEYS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "pooling", "posemb",
              "block")
VARIANT_HELP = (
    "the variant's own architecture, pooling (tok) and position embedding (learn) replace "
    f"the default model's width {BASE['width']}, depth {BASE['depth']}, MLP "
    f"{BASE['mlp_dim']}, {BASE['num_heads']} heads, patch {BASE['patch_size']}, "
    f"{BASE['pooling']} pooling and {BASE['posemb']} embedding; a recipe's model choices "
    "and explicit flags still apply")
OPTIMIZERS = ("adafactor", "adam", "shampoo")
LOSSES = ("softmax", "sigmoid")
# Settings that may change between a run and its resumption.
RESUMABLE_CHANGES = ("checkpoint_every", "keep_checkpoints", "eval_every", "fewshot",
                     "fewshot_dataset",
                     "progress", "workdir", "data_dir", "tpu", "tensorboard", "wandb")
# Real-valued settings: finite (JSON has no NaN), with their lower bound.
NUMBERS = {"lr": 0.0, "weight_decay": 0.0, "head_weight_decay": 0.0, "clipnorm": 0.0,
           "dropout": 0.0, "label_smoothing": 0.0, "distill_temperature": None,
           "distill_label_weight": 0.0}


def recipe_defaults(name):
    """BASE updated by the named recipe; unknown names list the known ones."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; use one of {', '.join(RECIPES)}.")
    return {**BASE, **RECIPES[name]}


def parse_fewshot(value):
    """The shots of a --fewshot setting ("1,5,10" -> [1, 5, 10]; "none" -> []).

    Example:
    ```python
    parse_fewshot("1,5,10")  # [1, 5, 10]
    ```
    """
    if value in (None, "none"):
        return []
    return check_shots(str(value), flag="--fewshot")


def _is_digits(spec):
    return str(spec).partition(":")[0] == "digits"


def _class_spec(classes):
    """(6, 7, 8, 9) -> "digits:6-9"; (0, 2, 3) -> "digits:0,2-3"."""
    runs = []
    for c in classes:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "digits:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def default_fewshot_dataset(dataset):
    """The downstream source when none is given: for a digits class split,
    the other digits (transfer to classes never trained on); otherwise the
    run's own dataset.

    Example:
    ```python
    default_fewshot_dataset("digits:0-5")  # "digits:6-9"
    default_fewshot_dataset("digits")      # "digits"
    ```
    """
    if _is_digits(dataset):
        rest = sorted(set(range(10)) - set(digit_classes(dataset)))
        if rest:
            return _class_spec(rest)
    return dataset


def check_fewshot_dataset(dataset, downstream):
    """Raises a ValueError, naming the value, for a downstream digits split
    that is malformed, leaves no class, names a digit outside 0-9, or shares
    any class with an upstream digits split: transfer is measured on classes
    the model never trained on. A run on all ten digits has no unseen digit
    left, so its few-shot table stays on its own classes.

    Args:
        dataset: the upstream (pretraining) dataset spec.
        downstream: the --fewshot-dataset spec.
    """
    if not _is_digits(downstream):
        return
    try:
        down = set(digit_classes(downstream))
    except ValueError as err:
        raise ValueError(f"--fewshot-dataset: {err}") from None
    if _is_digits(dataset):
        up = set(digit_classes(dataset))
        if down & up and not down == up == set(range(10)):
            raise ValueError(
                f"--fewshot-dataset {downstream!r} shares the classes "
                f"{sorted(down & up)} with --dataset {dataset!r}: downstream classes "
                "must be ones the model never trained on, e.g. "
                f"{default_fewshot_dataset(dataset)!r}.")


def build_schedule(config):
    """The run's learning-rate schedule (checks warmup and cooldown fit in
    the run's steps)."""
    extra = {"timescale": config["rsqrt_timescale"]} if config["schedule"] == "rsqrt" else {}
    return schedules.create(config["schedule"], config["lr"], config["steps"],
                            warmup_steps=config["warmup_steps"],
                            cooldown_steps=config["cooldown_steps"], **extra)


def _check_numbers(config):
    for name, low in NUMBERS.items():
        value = config.get(name)
        if value is None:
            continue
        flag = "--" + name.replace("distill_", "").replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (low is not None and value < low):
            bound = f" and >= {low}" if low is not None else ""
            raise ValueError(f"{flag} {value!r} must be a finite number{bound}, e.g. "
                             f"{BASE[name] if BASE.get(name) is not None else 1.0}.")


def resolve(settings):
    """Recipe defaults updated by the explicit settings (None = not given).

    Args:
        settings: dict of explicit settings, e.g. parsed flags; None values
            are ignored. "recipe" picks the defaults (see `RECIPES`).

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
    config = {"recipe": recipe, **recipe_defaults(recipe), **given}
    explicit = set(given) | set(RECIPES[recipe])
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
        config["fewshot"] = "1,5,10" if _is_digits(config["dataset"]) else "none"
    if _is_digits(config["dataset"]):
        digit_classes(config["dataset"])  # a bad class split, before any work
    if config["fewshot_dataset"] is None:
        config["fewshot_dataset"] = default_fewshot_dataset(config["dataset"])
    check_fewshot_dataset(config["dataset"], config["fewshot_dataset"])
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
    if steps % log_every:
        raise ValueError(f"--steps {steps} is not a multiple of --log-every {log_every}; "
                         f"use a multiple, e.g. --steps {steps - steps % log_every}.")
    _check_numbers(config)
    parse_fewshot(config["fewshot"])
    build_schedule(config)  # warmup + cooldown within the steps, a valid schedule
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
    """The `ViTConfig` of the run, from --preset, --variant or the default.

    With --preset or --variant, the `MODEL_KEYS` settings not given
    explicitly (nor by the recipe) are the preset's or variant's own.
    """
    fields = dict(num_classes=config["num_classes"], image_size=config["image_size"],
                  dropout_rate=config["dropout"],
                  head_bias_init=head_bias_init(config["loss"], config["num_classes"]))
    chosen = {k: config[k] for k in MODEL_KEYS if k in config and
              (k in explicit or not (config.get("preset") or "variant" in explicit))}
    fields.update(chosen)
    preset = config.get("preset")
    if preset:
        parsed = presets.parse_handle(preset)
        if parsed is not None:  # a tag (vit_b16.augreg_in21k) brings its checkpoint's fields
            return presets.builtin_config(parsed.name, tag=parsed.tag, **fields)
        # A directory or Hub repo (a timm one is converted once, into the cache).
        directory = pretrained.resolve_directory(preset, model_class=ViT)
        return presets.read_directory_config(directory).replace(**fields)
    return ViTConfig.from_variant(config["variant"], **fields)


def record_model(config, vit_config):
    """Makes config's model fields say what was built: "model" is the
    `ViTConfig`, and the top-level `MODEL_KEYS` are its values (not BASE's
    defaults that a --variant or --preset replaced)."""
    config["model"] = vit_config.to_dict()
    for key in MODEL_KEYS:
        value = config["model"][key]
        config[key] = value[0] if key == "patch_size" and value[0] == value[1] else value
    if config.get("preset"):
        config["variant"] = None
    return config


def differences(old, new):
    """Human-readable differences between two resolved configs, ignoring
    `RESUMABLE_CHANGES`."""
    keys = sorted((set(old) | set(new)) - set(RESUMABLE_CHANGES))
    return [f"{k}: workdir has {old.get(k)!r}, this run has {new.get(k)!r}"
            for k in keys if old.get(k) != new.get(k)]
