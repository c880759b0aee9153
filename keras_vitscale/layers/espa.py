"""E-SPA attention: a transformer without skips whose attention starts as a
fixed, slowly correlating matrix (He et al. 2023, "Deep Transformers without
Shortcuts: Modifying Self-attention for Faithful Signal Propagation").

Layer l's attention starts as A_l = L_l L_{l-1}^{-1}, where L_l is the
symmetric square root of Sigma_l[i, j] = exp(-gamma_l |i - j|) over the
raster index of the patches (Sigma_0 = I). The product A_l ... A_1 = L_l, so
the token kernel of the attention-only network is exactly Sigma_l: tokens
grow correlated slowly and never collapse (rank collapse is what kills deep
transformers without skips).

gamma_L = 0.005 as in the SimplEsT-ViT repository (Cepka 2023), with one
fix: the attention bias is normalised by each row's own sum (see
`espa_target_attention`).
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_vitscale.layers.attention import attention, merge_heads, split_heads
from keras_vitscale.layers.dense import TokenDense

GAMMA_LAST = 0.005


def espa_gammas(depth, gamma_last=GAMMA_LAST):
    """E-SPA decay rates gamma_l for layers l = 1..depth.

    alpha_L = sqrt(1 - exp(-2 gamma_L)) and
    gamma_l = -0.5 * ln(1 - alpha_L^(2 l / L)), so gamma_L = gamma_last and
    the kernel Sigma_l = exp(-gamma_l |i - j|) moves from near-identity
    (large gamma_1) to strongly correlated (small gamma_L) evenly in alpha.

    Args:
        depth: number of attention layers L.
        gamma_last: gamma_L of the last layer. Defaults to 0.005.

    Returns:
        float64 numpy array of shape (depth,).

    Example:
    ```python
    espa_gammas(12)[[0, 5, 11]]  # ~[0.571, 0.0525, 0.005]
    ```
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}.")
    if gamma_last <= 0:
        raise ValueError(f"gamma_last must be > 0 (0.005 in SimplEsT-ViT); got {gamma_last}.")
    alpha_last = math.sqrt(1.0 - math.exp(-2.0 * gamma_last))
    layers = np.arange(1, depth + 1, dtype="float64")
    return -0.5 * np.log1p(-(alpha_last ** (2.0 * layers / depth)))


@functools.lru_cache(maxsize=16)
def _kernel_roots(num_tokens, gamma):
    """(Sigma^(1/2), Sigma^(-1/2)) of exp(-gamma |i - j|), float64, cached."""
    index = np.arange(num_tokens, dtype="float64")
    sigma = np.exp(-gamma * np.abs(index[:, None] - index[None, :]))
    eigvals, eigvecs = np.linalg.eigh(sigma)
    # Sigma is positive definite (an Ornstein-Uhlenbeck covariance) but its
    # smallest eigenvalues approach rounding noise for small gamma.
    floor = eigvals.max() * num_tokens * np.finfo("float64").eps
    eigvals = np.maximum(eigvals, floor)
    root = (eigvecs * np.sqrt(eigvals)) @ eigvecs.T
    inverse_root = (eigvecs / np.sqrt(eigvals)) @ eigvecs.T
    return root, inverse_root


def espa_attention_matrix(num_tokens, layer, depth, gamma_last=GAMMA_LAST):
    """The target attention A_l = L_l L_{l-1}^{-1} (float64, entries > 0).

    Args:
        num_tokens: sequence length N (patches, no class token).
        layer: l in 1..depth.
        depth: L.
        gamma_last: gamma_L.

    Returns:
        (N, N) float64 array. Non-positive entries (rounding; E-SPA's
        positivity is only verified empirically) are clamped to a tiny
        positive value so that log(A) exists.
    """
    if not 1 <= layer <= depth:
        raise ValueError(f"layer must be in 1..{depth}; got {layer}.")
    gammas = espa_gammas(depth, gamma_last)
    current, _ = _kernel_roots(num_tokens, float(gammas[layer - 1]))
    if layer == 1:
        matrix = current.copy()  # Sigma_0 = I.
    else:
        _, previous_inverse = _kernel_roots(num_tokens, float(gammas[layer - 2]))
        matrix = current @ previous_inverse
    tiny = np.finfo("float32").tiny
    return np.maximum(matrix, tiny * np.abs(matrix).max())


def espa_target_attention(num_tokens, depth, gamma_last=GAMMA_LAST):
    """Per layer, the row scale d and logits bias B with d * softmax(B) = A_l.

    d_i = sum_j A_l[i, j] and B[i, j] = log(A_l[i, j] / d_i). Each ROW is
    normalised by its own sum, so softmax over keys (a row) gives A_l / d
    exactly. The public SimplEsT-ViT code computes `A / A.sum(1)`, which in
    broadcasting divides column j by row j's sum; as A_l is not symmetric
    that attention is not A_l at init (a likely bug, fixed here).

    Args:
        num_tokens: sequence length N.
        depth: number of layers L.
        gamma_last: gamma_L. Defaults to 0.005.

    Returns:
        list of `depth` pairs (d of shape (N,), B of shape (N, N)), float64.

    Example:
    ```python
    d, bias = espa_target_attention(196, 12)[0]
    attention = d[:, None] * scipy.special.softmax(bias, axis=-1)  # = A_1
    ```
    """
    out = []
    for layer in range(1, depth + 1):
        matrix = espa_attention_matrix(num_tokens, layer, depth, gamma_last)
        row_sums = matrix.sum(axis=1)
        out.append((row_sums, np.log(matrix / row_sums[:, None])))
    return out


class ESPAQKVInitializer(keras.initializers.Initializer):
    """Fused (D, 3D) QKV kernel: query part zero, keys and values N(0, 1/D).

    A zero query makes softmax(QK^T / sqrt(dh) + B) = softmax(B) at init, so
    the attention is exactly E-SPA's target; variance 1/D keeps V's scale.

    Args:
        seed: random seed.
    """

    def __init__(self, seed=None):
        self.seed = seed
        self._normal = keras.initializers.RandomNormal(stddev=1.0, seed=seed)

    def __call__(self, shape, dtype=None):
        fan_in, width = shape[0], shape[-1] // 3
        key_value = self._normal((fan_in, 2 * width), dtype=dtype) / math.sqrt(fan_in)
        return ops.concatenate([ops.zeros((fan_in, width), dtype=dtype), key_value], axis=-1)

    def get_config(self):
        return {"seed": self.seed}


class ESPAAttention(keras.layers.Layer):
    """E-SPA self-attention: out = d * softmax(Q K^T / sqrt(dh) + B) V.

    No output projection. B and d are constants computed once in float64 at
    build time from the sequence length and cast to the compute dtype; with
    the query kernel zero at init the attention matrix equals A_l.

    Args:
        num_heads: attention heads.
        layer_index: 0-based index of the block (layer l = layer_index + 1).
        depth: number of blocks L.
        gamma_last: gamma_L. Defaults to 0.005.
        qkv_bias: bias on the fused QKV projection (zero init).

    Example:
    ```python
    attn = ESPAAttention(num_heads=4, layer_index=0, depth=8)
    attn(keras.ops.ones((2, 64, 32))).shape  # (2, 64, 32)
    ```
    """

    def __init__(self, num_heads, layer_index, depth, gamma_last=GAMMA_LAST, qkv_bias=True,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0 <= layer_index < depth:
            raise ValueError(f"layer_index must be in 0..{depth - 1}; got {layer_index}.")
        self.num_heads = num_heads
        self.layer_index = layer_index
        self.depth = depth
        self.gamma_last = gamma_last
        self.qkv_bias = qkv_bias
        self.qkv = None

    def build(self, input_shape):
        num_tokens, width = input_shape[1], input_shape[-1]
        if num_tokens is None:
            raise ValueError(
                "ESPAAttention needs a static sequence length (its bias is an "
                "N x N constant); build it with a known number of patches.")
        self.qkv = TokenDense(3 * width, use_bias=self.qkv_bias, name="qkv",
                              kernel_initializer=ESPAQKVInitializer(), dtype=self.dtype_policy)
        self.qkv.build(input_shape)
        matrix = espa_attention_matrix(num_tokens, self.layer_index + 1, self.depth,
                                       self.gamma_last)
        row_sums = matrix.sum(axis=1)
        self.logits_bias = np.log(matrix / row_sums[:, None])[None, None].astype("float32")
        self.row_scale = row_sums[None, :, None, None].astype("float32")

    def call(self, x):
        q, k, v = (split_heads(t, self.num_heads) for t in ops.split(self.qkv(x), 3, axis=-1))
        y = attention(q, k, v, bias=ops.cast(self.logits_bias, q.dtype))
        return merge_heads(y * ops.cast(self.row_scale, y.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "layer_index": self.layer_index, "depth": self.depth,
                "gamma_last": self.gamma_last, "qkv_bias": self.qkv_bias}
