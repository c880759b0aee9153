"""Pooling heads: class token, mean of tokens, multi-head attention pooling."""

import keras
from keras import ops

from keras_vitscale.layers.attention import attention, merge_heads, split_heads
from keras_vitscale.layers.dense import TokenDense
from keras_vitscale.layers.mlp import MLP
from keras_vitscale.layers.normalization import LayerNorm


class MAPHead(keras.layers.Layer):
    """Multi-head attention pooling (Scaling ViT's MAP head).

    A learned probe (1, 1, D) queries the encoder tokens with multi-head
    attention; then x = x + MLP(LN(x)) and the probe's output is returned.
    No LayerNorm before the attention, as big_vision.

    Args:
        width: token width D.
        num_heads: attention heads (the model's).
        mlp_dim: MLP width (the model's).
        layer_norm_epsilon: epsilon of the LayerNorm before the MLP.
        gelu_flavour: "tanh" or "exact".

    Example:
    ```python
    head = MAPHead(width=32, num_heads=4, mlp_dim=128)
    head(keras.ops.ones((2, 16, 32))).shape  # (2, 32)
    ```
    """

    def __init__(self, width, num_heads, mlp_dim, layer_norm_epsilon=1e-6, gelu_flavour="tanh",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        dtype = self.dtype_policy
        self.query = TokenDense(width, name="query", dtype=dtype)
        self.key_value = TokenDense(2 * width, name="key_value", dtype=dtype)
        self.out = TokenDense(width, name="out", dtype=dtype)
        self.norm = LayerNorm(
            epsilon=layer_norm_epsilon, name="norm", dtype=dtype)
        self.mlp = MLP(mlp_dim, gelu_flavour=gelu_flavour, name="mlp", dtype=dtype)

    def build(self, input_shape):
        width = input_shape[-1]
        self.probe = self.add_weight(name="probe", shape=(1, 1, width),
                                     initializer="glorot_uniform")
        probe_shape = (input_shape[0], 1, width)
        self.query.build(probe_shape)
        self.key_value.build(input_shape)
        self.out.build(probe_shape)
        self.norm.build(probe_shape)
        self.mlp.build(probe_shape)

    def call(self, x):
        batch = ops.shape(x)[0]
        probe = ops.broadcast_to(ops.cast(self.probe, x.dtype), (batch, 1, x.shape[-1]))
        q = split_heads(self.query(probe), self.num_heads)
        k, v = ops.split(self.key_value(x), 2, axis=-1)
        k, v = split_heads(k, self.num_heads), split_heads(v, self.num_heads)
        y = self.out(merge_heads(attention(q, k, v)))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
