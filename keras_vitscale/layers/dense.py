"""TokenDense: a projection applied to every token as one rank-2 matmul.

Why not `keras.layers.Dense` or an einsum: on a (B, N, D) input their weight
gradient contracts two axes (batch and tokens) at once, which XLA lowers to a
transpose fused with the elementwise work before it: a strided copy that
takes a large share of a ViT training step on CPU and grows with depth
(benchmarks/RESULTS.md, "JAX formulations A/B"). Flattening to (B*N, D)
first makes every gradient a plain matmul (tests/test_model.py checks that
a compiled training step has no other weight-gradient dot).
"""

import math
import random

import keras
from keras import ops


class FusedXavierUniform(keras.initializers.Initializer):
    """Xavier-uniform for a kernel that fuses several projections.

    A fused (D, 3D) QKV kernel initialised as one matrix would get a smaller
    range than big_vision's three separate (D, D) kernels; this uses the fan
    of one part so the fused kernel has the same distribution.

    Seeded like Keras' own random initializers: `seed=None` fixes an integer
    seed when the initializer is constructed, drawn from Python's `random`
    (which `keras.utils.set_random_seed` seeds). So each instance (one per
    layer) draws its own values, the same global seed gives the same
    weights, and the draw needs no global seed state, which JAX refuses to
    advance inside a trace (`keras_vitscale.planning.abstract_state` builds
    a model in one).

    Args:
        parts: how many equal projections the output axis holds.
        seed: an int, or None to draw one now.

    Example:
    ```python
    init = FusedXavierUniform(parts=3)
    init((64, 192)).shape  # (64, 192), limit sqrt(6 / (64 + 64))
    ```
    """

    def __init__(self, parts=1, seed=None):
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"FusedXavierUniform seed must be an int or None; got {seed!r}.")
        self.parts = parts
        self.seed = seed
        # Drawn here, not at call time, as keras.initializers.RandomInitializer does.
        self._seed = random.randint(1, 10**9) if seed is None else seed

    def __call__(self, shape, dtype=None):
        fan_in, fan_out = math.prod(shape[:-1]), shape[-1] // self.parts
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return keras.random.uniform(shape, -limit, limit, dtype=dtype, seed=self._seed)

    def get_config(self):
        # The seed as given, as Keras' initializers do: a config with
        # seed=None draws a new seed when it is rebuilt.
        return {"parts": self.parts, "seed": self.seed}


class TokenDense(keras.layers.Layer):
    """y = x @ kernel + bias over the last axis, for inputs of any rank.

    Args:
        units: output width.
        use_bias: add a bias.
        kernel_initializer, bias_initializer: Keras initializers.

    Example:
    ```python
    proj = TokenDense(96)
    proj(keras.ops.ones((2, 197, 32))).shape  # (2, 197, 96)
    ```
    """

    def __init__(self, units, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.units),
            initializer=self.kernel_initializer)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer)

    def call(self, x):
        return project(x, self.kernel, self.bias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)


def project(x, kernel, bias=None):
    """Applies a 2D kernel to the last axis of x through one rank-2 matmul."""
    leading = ops.shape(x)[:-1]
    y = ops.matmul(ops.reshape(x, (-1, ops.shape(x)[-1])), kernel)
    if bias is not None:
        y = y + bias
    return ops.reshape(y, tuple(leading) + (ops.shape(kernel)[-1],))
