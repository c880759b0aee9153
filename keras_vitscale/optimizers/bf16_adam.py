"""Adam with a bfloat16 first moment (1.5x instead of 2x the parameter bytes).

"Scaling Vision Transformers" trains with a bfloat16 first moment and a
float32 second moment; storing the second moment in bfloat16 hurts, which is
why each dtype is a separate option.
"""

import keras
from keras import ops

from keras_vitscale.optimizers import weight_decay as wd_lib


@keras.saving.register_keras_serializable(package="keras_vitscale")
class BF16Adam(wd_lib.DecoupledWeightDecay, keras.optimizers.Optimizer):
    """Adam whose moments are stored in chosen dtypes (bf16 / f32 default).

    The maths is optax's `scale_by_adam` (epsilon outside the square root,
    after bias correction), which is what big_vision runs; Keras' `Adam`
    places epsilon before bias correction ("epsilon hat") and defaults it to
    1e-7, so the two differ in the first steps for tiny gradients.

        m = beta_1 m + (1 - beta_1) g         (stored in mu_dtype)
        v = beta_2 v + (1 - beta_2) g^2       (stored in nu_dtype)
        u = (m / (1 - beta_1^t)) / (sqrt(v / (1 - beta_2^t)) + epsilon)
        param = param - lr(t) * (u + weight_decay * mult * param)

    The moments are updated in float32 and only the stored copies are
    rounded, as optax does with `mu_dtype` (where `beta_1 * m` is computed in
    m's dtype, so beta_1 = 0.9 acts as 0.8984375 on the stored bf16 part).

    Weight decay is decoupled and follows the learning-rate schedule; with
    big_vision's `wd` and `wd_mults`, `wd_bv = weight_decay * base_lr` and
    the multipliers carry over unchanged. The paper's recipe (3.0 on the
    head, 0.03 on the body) is
    `BF16Adam(lr, weight_decay=0.03,
    weight_decay_multipliers={r".*head/kernel": 100.0, r".*kernel": 1.0})`.

    Args:
        learning_rate: float, `LearningRateSchedule` or callable. Not an
            integer.
        beta_1: first-moment decay. Defaults to 0.9.
        beta_2: second-moment decay. Defaults to 0.999.
        epsilon: added to the root of the second moment. Defaults to 1e-8.
        mu_dtype: dtype of the stored first moment. Defaults to "bfloat16".
        nu_dtype: dtype of the stored second moment. Defaults to "float32".
        weight_decay: decoupled weight decay rate (times the current
            learning rate). Defaults to 0.0.
        weight_decay_multipliers: dict `{regex on variable.path: mult}`,
            first full match wins, unmatched variables are not decayed.
            Defaults to `{r".*kernel$": 1.0}`.
        **kwargs: the Keras base optimizer arguments (`global_clipnorm`,
            `gradient_accumulation_steps`, `use_ema`, `loss_scale_factor`,
            `name`, ...).

    Example:

    ```python
    optimizer = kvs.optimizers.BF16Adam(
        kvs.schedules.create("cosine", base_lr=1e-3, total_steps=10_000,
                             warmup_steps=500),
        weight_decay=0.1, global_clipnorm=1.0)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    ```
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        mu_dtype="bfloat16",
        nu_dtype="float32",
        weight_decay=0.0,
        weight_decay_multipliers=None,
        name="bf16_adam",
        **kwargs,
    ):
        self._init_optimizer(learning_rate, name, weight_decay, weight_decay_multipliers,
                             **kwargs)
        self._init_moments(beta_1, beta_2, epsilon)
        self.mu_dtype = keras.backend.standardize_dtype(mu_dtype)
        self.nu_dtype = keras.backend.standardize_dtype(nu_dtype)
        wd_lib.check_decay_in_dtype("beta_1", beta_1, self.mu_dtype)

    def state_specs(self, shape, dtype="float32"):
        """Slots for a parameter: list of (name, shape, dtype, dropped axis)."""
        shape = tuple(shape)
        return [
            ("momentum", shape, self.mu_dtype, None),
            ("velocity", shape, self.nu_dtype, None),
        ]

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = [], []
        for variable in var_list:
            if self._overwrite_variable_with_gradient(variable):
                self._momentums.append(None)
                self._velocities.append(None)
                continue
            specs = self.state_specs(variable.shape, variable.dtype)
            (m_name, _, m_dtype, _), (v_name, _, v_dtype, _) = specs
            self._momentums.append(
                wd_lib.add_slot(self, variable, m_name, dtype=m_dtype)
            )
            self._velocities.append(
                wd_lib.add_slot(self, variable, v_name, dtype=v_dtype)
            )

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        compute = "float64" if variable.dtype == "float64" else "float32"
        g = ops.cast(gradient, compute)
        t = ops.cast(self.iterations + 1, compute)
        # First moment with optax's numerics for `mu_dtype`: `beta_1 * m` in
        # m's dtype (beta_1 rounded to it too), the sum in float32. The
        # second moment is always decayed in float32: 0.999 rounds to 1.0
        # in bfloat16. The step uses the unrounded float32 moments.
        decayed_m = ops.multiply(m, ops.cast(self.beta_1, m.dtype))
        new_m = (1.0 - self.beta_1) * g + ops.cast(decayed_m, compute)
        new_v = (1.0 - self.beta_2) * ops.square(g) + self.beta_2 * ops.cast(
            v, compute
        )
        self.assign(m, ops.cast(new_m, m.dtype))
        self.assign(v, ops.cast(new_v, v.dtype))
        m_hat = new_m / (1.0 - ops.power(self.beta_1, t))
        v_hat = new_v / (1.0 - ops.power(self.beta_2, t))
        u = m_hat / (ops.sqrt(v_hat) + self.epsilon)
        self._apply_decayed_step(variable, u, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "mu_dtype": self.mu_dtype,
                "nu_dtype": self.nu_dtype,
            }
        )
        return config
