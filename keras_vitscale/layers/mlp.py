"""The transformer MLPs: Dense -> GELU -> Dense (big_vision's MlpBlock) and
the packed SwiGLU (DINOv2's giant models, as timm's SwiGLUPacked)."""

import math

import keras
from keras import ops

from keras_vitscale.layers.dense import TokenDense
from keras_vitscale.layers.dropout import seeded_dropout


def mlp_bias_initializer():
    """big_vision initialises MLP biases with normal(1e-6), not zeros.

    A new initializer per weight, made at build time: a seedless Keras
    initializer draws its seed when it is constructed, so one shared
    module-level instance would take its seed at import, before
    `keras.utils.set_random_seed`, differ from process to process, and give
    every MLP bias in the model the same values.
    """
    return keras.initializers.RandomNormal(stddev=1e-6)


def gelu(x, flavour):
    """GELU: "tanh" approximation (big_vision) or "exact" erf form (timm)."""
    if flavour == "exact" and keras.backend.backend() == "jax":
        # The same function as jax.nn.gelu(approximate=False), which is written
        # with erfc: on XLA-CPU erfc and its derivative are slower than erf's
        # (benchmarks/RESULTS.md, throughput notes, "Exact GELU").
        return 0.5 * x * (1.0 + ops.erf(x * math.sqrt(0.5)))
    return ops.gelu(x, approximate=(flavour == "tanh"))


class MLP(keras.layers.Layer):
    """Two projections with a GELU between them.

    Args:
        hidden_dim: inner width.
        use_bias: biases on both projections.
        gelu_flavour: "tanh" or "exact".
        dropout_rate: dropout after the activation and after the output.

    Example:
    ```python
    mlp = MLP(hidden_dim=128)
    mlp(keras.ops.ones((2, 17, 32))).shape  # (2, 17, 32)
    ```
    """

    # Outputs of dense_1 per unit of hidden_dim: 2 in the packed SwiGLU.
    first_width_factor = 1

    def __init__(self, hidden_dim, use_bias=True, gelu_flavour="tanh", dropout_rate=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.gelu_flavour = gelu_flavour
        self.use_bias = use_bias
        self.dropout = seeded_dropout(dropout_rate, dtype=self.dtype_policy)
        self.dense_1 = self.dense_2 = None

    def build(self, input_shape):
        self.dense_1 = TokenDense(self.first_width_factor * self.hidden_dim,
                                  use_bias=self.use_bias, name="dense_1",
                                  bias_initializer=mlp_bias_initializer(), dtype=self.dtype_policy)
        self.dense_2 = TokenDense(input_shape[-1], use_bias=self.use_bias, name="dense_2",
                                  bias_initializer=mlp_bias_initializer(), dtype=self.dtype_policy)
        self.dense_1.build(input_shape)
        self.dense_2.build(tuple(input_shape[:-1]) + (self.hidden_dim,))

    def call(self, x, training=None):
        h = self.dropout(gelu(self.dense_1(x), self.gelu_flavour), training=training)
        return self.dropout(self.dense_2(h), training=training)


class SwiGLUMLP(MLP):
    """A gated MLP: [a | b] = dense_1(x), h = silu(a) * b, y = dense_2(h).

    One (D, 2 * hidden_dim) kernel holds both halves, gate first: the layout
    of timm's `SwiGLUPacked` (`GluMlp` with `gate_last=False`), so DINOv2
    checkpoints load as they are. The sublayers are `MLP`'s, with the same names.

    Args:
        hidden_dim: inner width after gating (4096 for DINOv2 giant, whose
            first kernel is (1536, 8192)).
        use_bias: biases on both projections.
        dropout_rate: dropout after the gating and after the output.

    Example:
    ```python
    mlp = SwiGLUMLP(hidden_dim=64)
    mlp(keras.ops.ones((2, 17, 32))).shape  # (2, 17, 32); dense_1 is (32, 128)
    ```
    """

    first_width_factor = 2

    def __init__(self, hidden_dim, use_bias=True, dropout_rate=0.0, **kwargs):
        super().__init__(hidden_dim, use_bias=use_bias, dropout_rate=dropout_rate, **kwargs)

    def call(self, x, training=None):
        h = self.dense_1(x)
        gate, value = h[..., : self.hidden_dim], h[..., self.hidden_dim:]
        h = self.dropout(ops.silu(gate) * value, training=training)
        return self.dropout(self.dense_2(h), training=training)
