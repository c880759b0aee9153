"""The modified Adafactor of "Scaling Vision Transformers" (Zhai et al. 2021).

Differences from `keras.optimizers.Adafactor`, all from the paper (and
big_vision's `scale_by_adafactor`):
- first momentum (beta1 0.9, no debiasing), stored in bfloat16;
- beta2_t = min(beta2_cap, 1 - t^-decay_rate): capped at 0.999 so the
  second moment keeps adapting late in training;
- no parameter-scale multiplication (no "relative step"): the learning rate
  is the step size;
- update clipping by block RMS is optional and off by default;
- no full-size float32 slot for factored parameters, so the state is about
  half the parameters' bytes (the bf16 momentum) plus row/column vectors.
"""

import keras
import numpy as np
from keras import ops

from keras_vitscale.optimizers import weight_decay as wd_lib


def factored_dims(shape, min_dim_size_to_factor):
    """(second largest axis, largest axis) to factor over, or None.

    The second moment is factored when the second largest dimension is at
    least `min_dim_size_to_factor`. Ties go to the lower axis index, as in
    optax (argsort of the shape).
    """
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def _stat_dtype(dtype):
    # Second moments stay in float32 even for bf16 parameters: the paper
    # reports that a low-precision second moment hurts.
    return "float64" if str(dtype) == "float64" else "float32"


@keras.saving.register_keras_serializable(package="keras_vitscale")
class ScalingAdafactor(wd_lib.DecoupledWeightDecay, keras.optimizers.Optimizer):
    """Adafactor as modified for ViT-G/14 ("Scaling Vision Transformers").

    For each parameter, with t = step + 1 (so beta2 = 0 at the first step):

        beta2_t = min(beta2_cap, 1 - t ** -decay_rate)
        g2 = g ** 2 + epsilon
        factored (2nd largest dim >= min_dim_size_to_factor):
            v_row = beta2_t v_row + (1 - beta2_t) mean(g2, largest axis)
            v_col = beta2_t v_col + (1 - beta2_t) mean(g2, 2nd largest axis)
            u = g / sqrt(v_row / mean(v_row) * v_col)   (outer product)
        otherwise:
            v = beta2_t v + (1 - beta2_t) g2;  u = g / sqrt(v)
        u = u / max(1, rms(u) / clipping_threshold)   (if threshold is set)
        m = momentum m + (1 - momentum) u;  u = m     (m kept in bfloat16)
        param = param - lr(t) * (u + weight_decay * mult * param)

    Weight decay is decoupled and follows the learning-rate schedule. Mapping
    from big_vision: its update is `-sched(t) * (lr * u + wd * mult * param)`
    with `lr` the base rate, so `wd_bv = weight_decay * base_lr`, and
    `wd_mults` is `weight_decay_multipliers` (same full-match regexes, first
    match wins). The paper's recipe (decay 3.0 on the head, 0.03 on the body;
    big_vision `wd = 0.03 * lr`, `wd_mults = [(".*head/kernel", 100),
    (".*/kernel", 1)]`) is one line:

        ScalingAdafactor(lr_schedule, weight_decay=0.03,
                         weight_decay_multipliers={r".*head/kernel": 100.0,
                                                   r".*kernel": 1.0})

    Args:
        learning_rate: float, `LearningRateSchedule` (see
            `kvs.schedules.create`) or callable. Not an integer.
        min_dim_size_to_factor: factor the second moment of a parameter
            when its second largest dimension is at least this. Defaults to
            32.
        decay_rate: exponent of the beta2 schedule. Defaults to 0.8.
        beta2_cap: upper bound of beta2_t. Defaults to 0.999.
        epsilon: added to the squared gradient. Defaults to 1e-30.
        clipping_threshold: block-RMS clipping threshold of the update, or
            None (default) for no clipping.
        momentum: first-moment EMA coefficient, or None / 0.0 for none.
            Defaults to 0.9.
        momentum_dtype: dtype of the first moment. Defaults to "bfloat16".
        weight_decay: decoupled weight decay rate (multiplied by the current
            learning rate). Defaults to 0.0.
        weight_decay_multipliers: dict `{regex on variable.path: mult}`,
            first full match wins, unmatched variables are not decayed.
            Defaults to `{r".*kernel$": 1.0}` (kernels only: no biases,
            norms, position embeddings, class token or MAP probe).
        **kwargs: the Keras base optimizer arguments (`global_clipnorm`,
            `gradient_accumulation_steps`, `use_ema`, `loss_scale_factor`,
            `name`, ...), except its `weight_decay` hook which this replaces.

    Example:

    ```python
    schedule = kvs.schedules.create("rsqrt", base_lr=8e-4,
                                    total_steps=1_000_000,
                                    warmup_steps=10_000,
                                    cooldown_steps=50_000)
    optimizer = kvs.optimizers.ScalingAdafactor(
        schedule, global_clipnorm=1.0, weight_decay=0.03,
        weight_decay_multipliers={r".*head/kernel": 100.0, r".*kernel": 1.0})
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    ```
    """

    def __init__(
        self,
        learning_rate=0.001,
        min_dim_size_to_factor=32,
        decay_rate=0.8,
        beta2_cap=0.999,
        epsilon=1e-30,
        clipping_threshold=None,
        momentum=0.9,
        momentum_dtype="bfloat16",
        weight_decay=0.0,
        weight_decay_multipliers=None,
        name="scaling_adafactor",
        **kwargs,
    ):
        self._init_optimizer(learning_rate, name, weight_decay, weight_decay_multipliers,
                             **kwargs)
        if (
            isinstance(min_dim_size_to_factor, bool)
            or not isinstance(min_dim_size_to_factor, (int, np.integer))
            or min_dim_size_to_factor < 1
        ):
            raise ValueError(
                f"min_dim_size_to_factor={min_dim_size_to_factor!r} must be "
                "an integer >= 1 (32 in the paper; a huge value disables "
                "factoring)."
            )
        self.min_dim_size_to_factor = int(min_dim_size_to_factor)
        self.decay_rate = wd_lib.check_hyperparameter("decay_rate", decay_rate)
        self.beta2_cap = wd_lib.check_hyperparameter(
            "beta2_cap", beta2_cap, high=1.0
        )
        self.epsilon = wd_lib.check_hyperparameter("epsilon", epsilon)
        if clipping_threshold is not None:
            clipping_threshold = wd_lib.check_hyperparameter(
                "clipping_threshold", clipping_threshold
            )
            if clipping_threshold == 0:
                raise ValueError(
                    "clipping_threshold=0 would zero every update; use None "
                    "to disable clipping or a positive threshold such as 1.0."
                )
        self.clipping_threshold = clipping_threshold
        self.momentum = (
            None
            if not momentum
            else wd_lib.check_hyperparameter(
                "momentum", momentum, high=1.0, open_high=True
            )
        )
        self.momentum_dtype = keras.backend.standardize_dtype(momentum_dtype)
        if self.momentum:
            wd_lib.check_decay_in_dtype(
                "momentum", self.momentum, self.momentum_dtype
            )

    def state_specs(self, shape, dtype="float32"):
        """Slots for a parameter: list of (name, shape, dtype, dropped axis).

        The single source of the optimizer's memory layout: `build` creates
        exactly these, and the memory benchmark counts them from shapes.
        """
        shape = tuple(shape)
        stat = _stat_dtype(dtype)
        dims = factored_dims(shape, self.min_dim_size_to_factor)
        specs = []
        if dims is not None:
            d1, d0 = dims
            specs.append(("v_row", shape[:d0] + shape[d0 + 1 :], stat, d0))
            specs.append(("v_col", shape[:d1] + shape[d1 + 1 :], stat, d1))
        else:
            specs.append(("v", shape, stat, None))
        if self.momentum:
            specs.append(("momentum", shape, self.momentum_dtype, None))
        return specs

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._slots = wd_lib.build_slots(self, var_list)

    def update_step(self, gradient, variable, learning_rate):
        slots = self._slots[self._get_variable_index(variable)]
        shape = tuple(variable.shape)
        stat = _stat_dtype(variable.dtype)
        g = ops.cast(gradient, stat)
        t = ops.cast(self.iterations + 1, stat)
        beta2 = ops.minimum(
            self.beta2_cap, 1.0 - ops.power(t, -self.decay_rate)
        )
        g2 = ops.add(ops.square(g), self.epsilon)

        dims = factored_dims(shape, self.min_dim_size_to_factor)
        if dims is not None:
            d1, d0 = dims
            v_row, v_col = slots["v_row"], slots["v_col"]
            new_row = beta2 * v_row + (1.0 - beta2) * ops.mean(g2, axis=d0)
            new_col = beta2 * v_col + (1.0 - beta2) * ops.mean(g2, axis=d1)
            self.assign(v_row, new_row)
            self.assign(v_col, new_col)
            # v_row lost axis d0, so axis d1 moved down by one if after it.
            row_axis = d1 - 1 if d1 > d0 else d1
            row_mean = ops.mean(new_row, axis=row_axis, keepdims=True)
            row_factor = ops.rsqrt(new_row / row_mean)
            col_factor = ops.rsqrt(new_col)
            u = g * ops.expand_dims(row_factor, d0)
            u = u * ops.expand_dims(col_factor, d1)
        else:
            v = slots["v"]
            new_v = beta2 * v + (1.0 - beta2) * g2
            self.assign(v, new_v)
            u = g * ops.rsqrt(new_v)

        if self.clipping_threshold is not None:
            rms = ops.sqrt(ops.mean(ops.square(u)))
            u = u / ops.maximum(1.0, rms / self.clipping_threshold)

        if self.momentum:
            m = slots["momentum"]
            # big_vision numerics (optax.ema with a bfloat16 accumulator):
            # `momentum * m` is computed in m's dtype, momentum included
            # (0.9 -> 0.8984375 in bf16), the sum in float32; the step uses
            # the float32 sum and only the stored copy is rounded.
            decayed = ops.multiply(m, ops.cast(self.momentum, m.dtype))
            u = (1.0 - self.momentum) * u + ops.cast(decayed, stat)
            self.assign(m, ops.cast(u, m.dtype))

        self._apply_decayed_step(variable, u, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "min_dim_size_to_factor": self.min_dim_size_to_factor,
                "decay_rate": self.decay_rate,
                "beta2_cap": self.beta2_cap,
                "epsilon": self.epsilon,
                "clipping_threshold": self.clipping_threshold,
                "momentum": self.momentum,
                "momentum_dtype": self.momentum_dtype,
            }
        )
        return config
