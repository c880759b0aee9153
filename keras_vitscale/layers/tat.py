"""TAT: activations that keep a network without skips close to linear at
initialisation (Zhang et al. 2022, "Deep Learning without Shortcuts:
Shaping the Kernel with Tailored Rectifiers").

Every activation is a scaled leaky ReLU (TReLU) whose negative slope makes
the whole network's correlation map C_f(0) = eta (0.9): the network starts
close to linear but not degenerate. Linear layers start as scaled orthogonal
matrices, which leave that map unchanged.
"""

import math

import keras
from keras import ops

from keras_vitscale.layers.dense import TokenDense

ETA = 0.9


def _leaky_relu_cmap(c, slope):
    """Local C-map of the normalised leaky ReLU (TAT, eq. 9)."""
    c = min(max(c, -1.0), 1.0)
    scale = (1.0 - slope) ** 2 / (math.pi * (1.0 + slope**2))
    return c + scale * (math.sqrt(1.0 - c * c) - c * math.acos(c))


def _network_cmap_at_zero(slope, num_activations):
    c = 0.0
    for _ in range(num_activations):
        c = _leaky_relu_cmap(c, slope)
    return c


def tat_slope(depth, eta=ETA):
    """Leaky-ReLU negative slope a such that the network's C_f(0) = eta.

    The vanilla block has two TReLUs and its other maps (E-SPA attention,
    orthogonal linears) leave a token's correlation map unchanged, so the
    network's C-map is the local map composed 2 * depth times. Bisection on
    [0, 1]: a = 1 is linear (C_f(0) = 0), smaller a is more nonlinear.

    Args:
        depth: number of vanilla blocks (config.depth).
        eta: target C_f(0). Defaults to 0.9.

    Returns:
        float slope in [0, 1].

    Example:
    ```python
    tat_slope(12)  # ~0.2385
    ```
    """
    if not 0.0 < eta < 1.0:
        raise ValueError(f"eta must be in (0, 1) (0.9 in TAT); got {eta}.")
    num_activations = 2 * int(depth)
    if _network_cmap_at_zero(0.0, num_activations) < eta:
        minimum = next(d for d in range(1, 10_000) if _network_cmap_at_zero(0.0, 2 * d) >= eta)
        raise ValueError(
            f"TAT cannot reach C_f(0) = {eta} with depth {depth}: even a plain "
            f"ReLU network of {num_activations} activations is too linear. Use "
            f"depth >= {minimum} for eta {eta}, or a smaller eta."
        )
    low, high = 0.0, 1.0  # C_f(0) decreases as the slope grows.
    for _ in range(100):
        mid = 0.5 * (low + high)
        if _network_cmap_at_zero(mid, num_activations) > eta:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


class TReLU(keras.layers.Layer):
    """sqrt(2 / (1 + a^2)) * leaky_relu(x, a): unit second moment for N(0, 1).

    Args:
        negative_slope: a, usually `tat_slope(depth)`.

    Example:
    ```python
    act = TReLU(tat_slope(12))
    act(keras.ops.ones((2, 3)))  # sqrt(2 / (1 + a^2)) everywhere
    ```
    """

    def __init__(self, negative_slope, **kwargs):
        super().__init__(**kwargs)
        self.negative_slope = float(negative_slope)
        self.scale = math.sqrt(2.0 / (1.0 + self.negative_slope**2))

    def call(self, x):
        return ops.leaky_relu(x, negative_slope=self.negative_slope) * ops.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


class ScaledUniformOrthogonal(keras.initializers.Initializer):
    """Orthogonal kernel times max(sqrt(fan_out / fan_in), 1) (DKS / TAT).

    With zero biases the layer preserves the mean squared activation per
    unit: a widening (D, 4D) kernel gets gain 2, a narrowing one gain 1.

    Args:
        seed: random seed.

    Example:
    ```python
    kernel = ScaledUniformOrthogonal()((64, 256))  # kernel @ kernel.T = 4 I
    ```
    """

    def __init__(self, seed=None):
        self.seed = seed
        self._orthogonal = keras.initializers.Orthogonal(gain=1.0, seed=seed)

    def __call__(self, shape, dtype=None):
        fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
        gain = max(math.sqrt(fan_out / fan_in), 1.0)
        return self._orthogonal(shape, dtype=dtype) * gain

    def get_config(self):
        return {"seed": self.seed}


class TATMLP(keras.layers.Layer):
    """Linear -> TReLU -> Linear -> TReLU, scaled uniform orthogonal kernels.

    Args:
        hidden_dim: inner width.
        negative_slope: TReLU slope a.
        use_bias: biases (zero init) on both projections.
    """

    def __init__(self, hidden_dim, negative_slope, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.negative_slope = negative_slope
        self.use_bias = use_bias
        self.activation = TReLU(negative_slope, dtype=self.dtype_policy)
        self.dense_1 = self.dense_2 = None

    def build(self, input_shape):
        def dense(units, name):
            return TokenDense(units, use_bias=self.use_bias, name=name,
                              kernel_initializer=ScaledUniformOrthogonal(),
                              bias_initializer="zeros", dtype=self.dtype_policy)

        self.dense_1 = dense(self.hidden_dim, "dense_1")
        self.dense_2 = dense(input_shape[-1], "dense_2")
        self.dense_1.build(input_shape)
        self.dense_2.build(tuple(input_shape[:-1]) + (self.hidden_dim,))

    def call(self, x):
        return self.activation(self.dense_2(self.activation(self.dense_1(x))))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim,
                "negative_slope": self.negative_slope, "use_bias": self.use_bias}
