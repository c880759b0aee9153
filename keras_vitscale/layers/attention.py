"""Multi-head self-attention with fused QKV, optional QK-LayerNorm.

The attention core has two formulations, chosen like timm's fused-attention
switch:

- "fused": `keras.ops.dot_product_attention`, the backend's fused kernel
  (cuDNN or flash attention on GPU, torch's scaled_dot_product_attention);
- "explicit": softmax(q k^T / sqrt(dh) + bias) v written out as two batched
  matmuls in head-major layout, with the softmax in float32; on CPU, JAX and
  TensorFlow run it faster than dot_product_attention's XLA lowering
  (benchmarks/RESULTS.md, "JAX formulations A/B" and the throughput notes);
- "auto" (the default): "explicit" where JAX or TensorFlow runs on CPU only,
  "fused" on a GPU or TPU and on torch.

Choose with `set_attention_implementation(name)` or the environment variable
`KVS_ATTENTION=auto|fused|explicit`; the setter wins over the variable. Both
formulations compute the same function (to float32 rounding). The choice is
read when attention is traced, so set it before a model's first call or
compiled step.
"""

import functools
import os

import keras
from keras import ops

from keras_vitscale.layers.dense import FusedXavierUniform, TokenDense
from keras_vitscale.layers.dropout import seeded_dropout
from keras_vitscale.layers.normalization import LayerNorm

ATTENTION_ENV = "KVS_ATTENTION"
ATTENTION_IMPLEMENTATIONS = ("auto", "fused", "explicit")
_chosen_implementation = None  # set by set_attention_implementation


def _checked(name, source):
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"{source} is {name!r}; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
            '("auto" picks "explicit" on a CPU-only JAX or TensorFlow, else "fused").')
    return name


def set_attention_implementation(name):
    """Chooses the attention formulation for the whole process.

    Args:
        name: "auto", "fused" or "explicit" (see the module docstring), or
            None to go back to the `KVS_ATTENTION` environment variable
            (default "auto").

    Returns:
        The previous setting (a name or None), so a caller can restore it.

    Example:
    ```python
    previous = set_attention_implementation("fused")
    ...
    set_attention_implementation(previous)
    ```
    """
    global _chosen_implementation
    previous = _chosen_implementation
    _chosen_implementation = None if name is None else _checked(
        name, "set_attention_implementation's name")
    return previous


def attention_implementation():
    """The attention formulation in force: "auto", "fused" or "explicit".

    The value given to `set_attention_implementation`, else the
    `KVS_ATTENTION` environment variable, else "auto".

    Example:
    ```python
    attention_implementation()  # "auto" unless chosen
    ```
    """
    if _chosen_implementation is not None:
        return _chosen_implementation
    return _checked(os.environ.get(ATTENTION_ENV, "auto"), f"${ATTENTION_ENV}")


@functools.cache  # the backend and its devices are fixed for the process
def _explicit_is_faster_here():
    # On CPU the explicit head-major formulation beats dot_product_attention's
    # XLA path on JAX and TensorFlow (benchmarks/RESULTS.md, "JAX formulations
    # A/B"); elsewhere the fused kernel (cuDNN, flash, torch SDPA) is the one.
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return False


def _use_explicit():
    name = attention_implementation()
    if name == "auto":
        return _explicit_is_faster_here()
    return name == "explicit"


def attention(query, key, value, bias=None):
    """softmax(q k^T / sqrt(dh) + bias) v for (B, N, H, dh) inputs.

    The formulation follows `attention_implementation()`.

    Args:
        query: (B, T, H, dh). key, value: (B, S, H, dh).
        bias: optional additive logits bias broadcastable to (B, H, T, S).

    Returns:
        (B, T, H, dh).

    Example:
    ```python
    q = keras.ops.ones((2, 17, 4, 16))
    attention(q, q, q).shape  # (2, 17, 4, 16)
    ```
    """
    if not _use_explicit():
        return ops.dot_product_attention(query, key, value, bias=bias)
    scale = ops.cast(1.0 / (query.shape[-1] ** 0.5), query.dtype)
    # Head-major (B, H, N, dh) operands and plain batched matmuls: written as
    # "bthd,bshd->bhts" einsums, XLA-CPU fused both products and the softmax
    # into one much slower YNNPACK call (benchmarks/RESULTS.md, throughput
    # notes, "Profile").
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

    The attention core is `attention`: the backend's fused kernel or the
    explicit softmax(q k^T) v, per `set_attention_implementation` or
    `KVS_ATTENTION=auto|fused|explicit` (default "auto": explicit on a
    CPU-only JAX or TensorFlow, fused otherwise; same outputs to float32
    rounding).

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
