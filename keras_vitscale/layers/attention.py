"""Multi-head self-attention with fused QKV, optional QK-LayerNorm."""

import functools

import keras
from keras import ops

from keras_vitscale.layers.dense import FusedXavierUniform, TokenDense
from keras_vitscale.layers.dropout import seeded_dropout
from keras_vitscale.layers.normalization import LayerNorm


@functools.cache  # the backend and its devices are fixed for the process
def _use_xla_cpu_path():
    # PERF-NOTES rule 3: on CPU a plain softmax(QK^T)V in head-major layout is
    # faster than dot_product_attention's XLA path (ViT-S/16 on JAX: +12-28%
    # inference, +4-12% training; on TensorFlow +11% inference; RESULTS.md
    # "jax_formulations"); elsewhere the fused kernel (cuDNN / flash / torch
    # SDPA) is the one to use.
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return False


def attention(query, key, value, bias=None):
    """softmax(q k^T / sqrt(dh) + bias) v for (B, N, H, dh) inputs.

    Args:
        query: (B, T, H, dh). key, value: (B, S, H, dh).
        bias: optional additive logits bias broadcastable to (B, H, T, S).

    Returns:
        (B, T, H, dh).
    """
    if not _use_xla_cpu_path():
        return ops.dot_product_attention(query, key, value, bias=bias)
    scale = ops.cast(1.0 / (query.shape[-1] ** 0.5), query.dtype)
    # Head-major (B, H, N, dh) operands and plain batched matmuls: written as
    # "bthd,bshd->bhts" einsums, XLA-CPU fused both products and the softmax
    # into one YNNPACK call that ran 3x slower than this.
    q = ops.transpose(query * scale, (0, 2, 1, 3))
    k = ops.transpose(key, (0, 2, 3, 1))
    v = ops.transpose(value, (0, 2, 1, 3))
    logits = ops.matmul(q, k)
    if bias is not None:
        logits = logits + ops.cast(bias, logits.dtype)
    # Softmax in float32 even under mixed precision, like the fused kernels.
    weights = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), value.dtype)
    return ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))


def split_heads(x, num_heads):
    """(B, N, H*dh) -> (B, N, H, dh)."""
    # A static head_dim keeps shapes known in TensorFlow's symbolic graphs.
    head_dim = x.shape[-1] // num_heads
    return ops.reshape(x, (ops.shape(x)[0], ops.shape(x)[1], num_heads, head_dim))


def merge_heads(x):
    """(B, N, H, dh) -> (B, N, H*dh)."""
    return ops.reshape(x, (ops.shape(x)[0], ops.shape(x)[1], x.shape[-2] * x.shape[-1]))


class MultiHeadSelfAttention(keras.layers.Layer):
    """Self-attention with one fused (D, 3D) QKV projection.

    Args:
        width: token width D.
        num_heads: attention heads.
        qkv_bias, out_bias: bias switches.
        qk_norm: LayerNorm per head on queries and keys.
        norm_bias: bias in the qk LayerNorms.
        layer_norm_epsilon: their epsilon.
        dropout_rate: dropout on the output.

    Example:
    ```python
    attn = MultiHeadSelfAttention(width=64, num_heads=4)
    attn(keras.ops.ones((2, 17, 64))).shape  # (2, 17, 64)
    ```
    """

    def __init__(self, width, num_heads, qkv_bias=True, out_bias=True, qk_norm=False,
                 norm_bias=True, layer_norm_epsilon=1e-6, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.qkv = TokenDense(3 * width, use_bias=qkv_bias, name="qkv",
                              kernel_initializer=FusedXavierUniform(parts=3),
                              dtype=self.dtype_policy)
        self.out = TokenDense(width, use_bias=out_bias, name="out",
                              kernel_initializer="glorot_uniform", dtype=self.dtype_policy)
        self.query_norm = self.key_norm = None
        if qk_norm:
            self.query_norm = LayerNorm(
                epsilon=layer_norm_epsilon, center=norm_bias, name="query_norm",
                dtype=self.dtype_policy)
            self.key_norm = LayerNorm(
                epsilon=layer_norm_epsilon, center=norm_bias, name="key_norm",
                dtype=self.dtype_policy)
        self.dropout = seeded_dropout(dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shape):
        width = input_shape[-1]
        self.qkv.build(input_shape)
        self.out.build(input_shape)
        if self.query_norm is not None:
            head_shape = tuple(input_shape[:-1]) + (self.num_heads, width // self.num_heads)
            self.query_norm.build(head_shape)
            self.key_norm.build(head_shape)

    def call(self, x, training=None):
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)
        y = attend(q, k, v, self.num_heads, self.query_norm, self.key_norm)
        return self.dropout(self.out(y), training=training)


def attend(q, k, v, num_heads, query_norm=None, key_norm=None, bias=None):
    """Splits heads, applies the optional qk-norm, attends, merges heads."""
    q, k, v = (split_heads(t, num_heads) for t in (q, k, v))
    if query_norm is not None:
        q, k = query_norm(q), key_norm(k)
    return merge_heads(attention(q, k, v, bias=bias))
