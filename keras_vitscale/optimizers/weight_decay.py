"""Decoupled weight decay with per-variable multipliers, shared by optimizers.

Every optimizer of this package decays weights the same way (AdamW-like,
"decoupled" from the gradient, following the learning-rate schedule):

    variable <- variable - lr(t) * (direction + weight_decay * mult * variable)

where `direction` is the optimizer's own update (Adam step, Adafactor step,
...) and `mult` comes from the first regex of `weight_decay_multipliers` that
fully matches `variable.path` (0 when none matches). The decay is applied
inside `update_step`, together with the gradient step, rather than through
the Keras base class' `weight_decay` hook, so that it runs in the same place
as the update on every backend (under `tf.distribute`, gradient accumulation
and JAX's stateless apply alike) and reads the parameter before the step, as
big_vision does.

To add decay to a new optimizer (e.g. Shampoo), inherit the mixin before the
Keras base class and use three calls:

    class Shampoo(DecoupledWeightDecay, keras.optimizers.Optimizer):
        def __init__(self, learning_rate=0.001, ..., weight_decay=0.0,
                     weight_decay_multipliers=None, name="my_optimizer", **kwargs):
            self._init_optimizer(learning_rate, name, weight_decay,
                                 weight_decay_multipliers, **kwargs)

        def build(self, var_list):
            ...
            super().build(var_list)   # resolves the multipliers

        def update_step(self, gradient, variable, learning_rate):
            direction = ...
            self._apply_decayed_step(variable, direction, learning_rate)

`get_config` of the mixin adds both arguments, so `from_config` works.
"""

import difflib
import math
import numbers
import re
import warnings

import keras
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; a keras dep)
import numpy as np
from keras import ops

# big_vision's default `wd_mults`: decay kernels only. Biases, LayerNorm
# scales/offsets, position embeddings, the class token and the MAP probe are
# not named `kernel` and are left alone.
DEFAULT_MULTIPLIERS = {r".*kernel$": 1.0}


def check_hyperparameter(name, value, low=0.0, high=math.inf, open_high=False):
    """Raises a ValueError naming `name` unless `low <= value <= high`.

    Shared by the optimizers of this package for their float arguments.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a real number, got {value!r} "
            f"({type(value).__name__})."
        )
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    too_high = value >= high if open_high else value > high
    if value < low or too_high:
        bracket = ")" if open_high else "]"
        raise ValueError(
            f"{name}={value} is out of range; use a value in "
            f"[{low}, {high}{bracket}."
        )
    return float(value)


def check_decay_in_dtype(name, beta, dtype):
    """Rejects an EMA coefficient that rounds to 1 in a low-precision state.

    First moments follow big_vision/optax numerics: `beta * state` is
    computed in the state's dtype, so beta itself is rounded to it (0.9 ->
    0.8984375 in bfloat16). A beta that rounds to 1.0 (0.999 in bfloat16)
    would stop the average from ever forgetting.
    """
    rounded = float(np.asarray(beta, dtype="float32").astype(np.dtype(dtype)))
    if beta and rounded >= 1.0:
        raise ValueError(
            f"{name}={beta} rounds to {rounded} in {dtype}, so the moving "
            f"average would never decay; use a {name} <= 0.996 or store the "
            "state in float32."
        )


def check_learning_rate(learning_rate):
    """Rejects integer, negative and non-finite constant learning rates.

    Schedules and callables pass through untouched: Keras evaluates them.
    """
    if callable(learning_rate):
        return learning_rate
    if isinstance(learning_rate, numbers.Integral):
        raise ValueError(
            f"learning_rate={learning_rate!r} is an integer; Keras stores a "
            f"constant learning rate in a float variable. Pass "
            f"{float(learning_rate)!r} or a LearningRateSchedule."
        )
    return check_hyperparameter("learning_rate", learning_rate)


def normalize_multipliers(multipliers):
    """Validates `{regex: multiplier}` and returns it as an ordered dict.

    Accepts a dict or a sequence of `(regex, multiplier)` pairs (the
    big_vision `wd_mults` form). Order matters: the first match wins.
    """
    if multipliers is None:
        return dict(DEFAULT_MULTIPLIERS)
    items = multipliers.items() if hasattr(multipliers, "items") else multipliers
    result = {}
    for item in items:
        try:
            pattern, mult = item
        except (TypeError, ValueError):
            raise ValueError(
                "weight_decay_multipliers must be a dict {regex: multiplier} "
                f"or a list of (regex, multiplier) pairs; got entry {item!r}."
            ) from None
        if not isinstance(pattern, str):
            raise ValueError(
                f"weight_decay_multipliers key {pattern!r} is not a string; "
                "keys are regular expressions on variable.path."
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"weight_decay_multipliers key {pattern!r} is not a valid "
                f"regular expression: {e}."
            ) from None
        result[pattern] = check_hyperparameter(
            f"weight_decay_multipliers[{pattern!r}]", mult
        )
    return result


def resolve_multipliers(paths, multipliers, warn=True):
    """Returns one float multiplier per path; first full match wins, else 0.

    Warns about every regex that matches none of `paths`, listing the paths
    it most likely meant (those it matches with `re.search`, or the closest
    strings), since a silent typo would silently disable decay.
    """
    compiled = [(re.compile(p), p, m) for p, m in multipliers.items()]
    matched = set()
    values = []
    for path in paths:
        value = 0.0
        for regex, pattern, mult in compiled:
            if regex.fullmatch(path):
                value = mult
                matched.add(pattern)
                break
        values.append(value)
    if warn:
        for regex, pattern, _ in compiled:
            if pattern in matched or any(regex.fullmatch(p) for p in paths):
                continue  # Shadowed by an earlier regex is fine.
            near = [p for p in paths if regex.search(p)][:5] or _closest(
                pattern, paths
            )
            warnings.warn(
                f"weight_decay_multipliers regex {pattern!r} fully matches no "
                f"variable path. paths it may have meant: {near}. Regexes "
                "must match the whole path (re.fullmatch), e.g. "
                "r'.*head/kernel'.",
                stacklevel=3,
            )
    return values


def _closest(pattern, paths, n=5):
    """Paths whose name segments look most like the regex's literal text."""
    literal = re.sub(r"[\\^$.*+?()\[\]{}|]", "", pattern)

    def score(path):
        parts = [path] + path.split("/")
        return max(
            difflib.SequenceMatcher(None, literal, part).ratio()
            for part in parts
        )

    return sorted(paths, key=score, reverse=True)[:n]


def _tf_replicas_in_sync():
    """Replicas of the `tf.distribute` replica context we run in, else 1."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()  # None in cross-replica code
    return 1 if context is None else context.num_replicas_in_sync


class DecoupledWeightDecay:
    """Mixin adding `weight_decay` and `weight_decay_multipliers`.

    Put it before `keras.optimizers.Optimizer` in the bases. See the module
    docstring for the three calls an optimizer makes.
    """

    def _init_optimizer(self, learning_rate, name, weight_decay, weight_decay_multipliers,
                        **kwargs):
        """What every optimizer here does first: checks the learning rate,
        runs the Keras optimizer's __init__ and sets up the weight decay."""
        super().__init__(learning_rate=check_learning_rate(learning_rate), name=name,
                         **kwargs)
        self._init_weight_decay(weight_decay, weight_decay_multipliers)

    def _init_moments(self, beta_1, beta_2, epsilon):
        """Checks and sets Adam's moment decays and epsilon."""
        self.beta_1 = check_hyperparameter("beta_1", beta_1, high=1.0, open_high=True)
        self.beta_2 = check_hyperparameter("beta_2", beta_2, high=1.0, open_high=True)
        self.epsilon = check_hyperparameter("epsilon", epsilon)

    def _init_weight_decay(self, weight_decay, weight_decay_multipliers):
        # The Keras base keeps its own `weight_decay` attribute (None here)
        # for its pre-update hook; ours lives under another name so the two
        # never both apply.
        self._decay_rate = check_hyperparameter("weight_decay", weight_decay)
        self._decay_multipliers = normalize_multipliers(
            weight_decay_multipliers
        )
        self._decay_per_variable = []

    @property
    def weight_decay_multipliers(self):
        return dict(self._decay_multipliers)

    def build(self, var_list):
        super().build(var_list)
        paths = [getattr(v, "path", v.name) for v in var_list]
        mults = resolve_multipliers(
            paths, self._decay_multipliers, warn=self._decay_rate > 0
        )
        self._decay_per_variable = [self._decay_rate * m for m in mults]

    def _variable_decay(self, variable):
        """Python float `weight_decay * multiplier` for `variable`."""
        return self._decay_per_variable[self._get_variable_index(variable)]

    def _apply_decayed_step(self, variable, direction, learning_rate):
        """variable -= lr * (direction + wd * mult * variable)."""
        lr = ops.cast(learning_rate, variable.dtype)
        direction = ops.cast(direction, variable.dtype)
        decay = self._variable_decay(variable)
        if decay:
            direction = ops.add(direction, ops.multiply(variable, decay))
        self.assign_sub(variable, ops.multiply(lr, direction))

    def _clip_gradients(self, grads):
        # Keras' TensorFlow optimizer clips before its all-reduce, i.e. each
        # replica's share of the gradient under tf.distribute, so a global
        # norm would be measured on a slice of the batch. With several
        # replicas, clipping waits for the summed gradient (below).
        if _tf_replicas_in_sync() > 1:
            return grads
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Called on the TensorFlow backend only (TFOptimizer's hook), with
        # per-replica gradients, inside `_backend_update_step`.
        reduced = super()._all_reduce_sum_gradients(grads_and_vars)
        if _tf_replicas_in_sync() <= 1:
            return reduced
        grads = super()._clip_gradients([g for g, _ in reduced])
        return list(zip(grads, [v for _, v in reduced]))

    def get_config(self):
        config = super().get_config()
        config["weight_decay"] = self._decay_rate
        config["weight_decay_multipliers"] = dict(self._decay_multipliers)
        return config


def layout_without_axis(layout, axis, rank):
    """The parameter's layout with dimension `axis` dropped, or None.

    Used for statistics reduced over `axis` (Adafactor's row/column second
    moments): the remaining dimensions keep the parameter's sharding.
    `rank` is the parameter's rank.
    """
    if layout is None:
        return None
    axes = getattr(layout, "axes", None)
    if axes is None:
        # Not a keras TensorLayout (a raw backend sharding): replicate rather
        # than guess, so that shape and layout always agree.
        distribution = keras.distribution.distribution()
        if distribution is None:
            return None
        return keras.distribution.TensorLayout(
            [None] * (rank - 1), distribution.device_mesh
        )
    axes = tuple(a for i, a in enumerate(axes) if i != axis)
    return keras.distribution.TensorLayout(axes, layout.device_mesh)


def add_slot(optimizer, reference, name, shape=None, dtype=None, drop_axis=None):
    """Adds an optimizer variable derived from `reference`.

    Like `Optimizer.add_variable_from_reference`, but with its own shape and
    dtype, and a layout derived from the parameter's (with `drop_axis`
    removed for reduced statistics), so that sharded parameters get sharded
    optimizer state under `keras.distribution.ModelParallel`.
    """
    layout = getattr(reference, "_layout", None)
    if drop_axis is not None:
        layout = layout_without_axis(layout, drop_axis, len(reference.shape))
    elif shape is not None and tuple(shape) != tuple(reference.shape):
        # A slot of an unrelated shape (a Shampoo preconditioner) cannot
        # follow the parameter's layout: it is replicated.
        layout = None
    prefix = getattr(reference, "path", reference.name).replace("/", "_")
    return optimizer.add_variable(
        shape=tuple(reference.shape) if shape is None else tuple(shape),
        dtype=reference.dtype if dtype is None else dtype,
        layout=layout,
        name=f"{prefix}_{name}",
    )


def build_slots(optimizer, var_list):
    """One {slot name: variable} dict per parameter, from `state_specs`.

    `optimizer.state_specs(shape, dtype)` lists (name, shape, dtype, dropped
    axis) per slot; parameters that are overwritten by their gradient get no
    slots.
    """
    slots = []
    for variable in var_list:
        if optimizer._overwrite_variable_with_gradient(variable):
            slots.append({})
            continue
        slots.append({
            name: add_slot(optimizer, variable, name, shape, dtype, drop_axis=axis)
            for name, shape, dtype, axis in optimizer.state_specs(variable.shape,
                                                                  variable.dtype)
        })
    return slots
