"""SimplEsT-ViT: a ViT without LayerNorm or skip connections (E-SPA + TAT).

A vanilla block is [E-SPA attention, no output projection] followed by
[Linear, TReLU, Linear, TReLU]. Signal propagation at initialisation is kept
healthy by two recipes instead of normalisation and residuals:

- E-SPA (He et al. 2023, "Deep Transformers without Shortcuts"): layer l's
  attention starts as a fixed matrix A_l = L_l L_{l-1}^{-1}, where L_l is the
  symmetric square root of Sigma_l[i, j] = exp(-gamma_l |i - j|) over the
  raster index of the patches. The product A_l ... A_1 = L_l, so the token
  kernel of the attention-only network is exactly Sigma_l: tokens grow
  correlated slowly and never collapse (rank collapse is what kills deep
  transformers without skips).
- TAT (Zhang et al. 2022): every activation is a scaled leaky ReLU whose
  slope makes the whole network's correlation map C_f(0) = eta (0.9), i.e.
  the network starts close to linear but not degenerate.

The numbers follow the SimplEsT-ViT repository (gamma_L = 0.005, eta = 0.9,
2 * depth TReLUs) except for one fix: the attention bias is normalised by
each row's own sum (see `espa_target_attention`).
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_vitscale.config import ViTConfig
from keras_vitscale.layers.attention import attention, merge_heads, split_heads
from keras_vitscale.layers.dense import TokenDense

ETA = 0.9
GAMMA_LAST = 0.005


# ---- E-SPA ------------------------------------------------------------------
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


# ---- TAT ----------------------------------------------------------------------
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


# ---- initialisers -----------------------------------------------------------
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


def vanilla_patch_initializer(config):
    """normal(0, variance 1 / patch_dim) for the (ph, pw, C, D) patch kernel.

    patch_dim = ph * pw * C is the fan-in; the SimplEsT-ViT repository uses
    std = patch_dim ** -0.5, i.e. variance 1 / patch_dim.

    Args:
        config: the model's `ViTConfig`.
    """
    ph, pw = config.patch_size
    return keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(ph * pw * config.in_channels))


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


# ---- layers -------------------------------------------------------------------
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


class VanillaBlock(keras.layers.Layer):
    """SimplEsT-ViT block: E-SPA attention, then the TAT MLP; no norm, no skip.

    The TReLU slope is `tat_slope(config.depth)`: the network's C-map is the
    leaky-ReLU map composed once per TReLU, 2 * depth times (two per block),
    as in the SimplEsT-ViT repository. Patch embedding, attention and linear
    layers are (near-)linear and do not count; REFERENCE's "effective depth
    64 * 3 + 2" counts layers, not nonlinearities.

    Args:
        config: the model's `ViTConfig` (block "vanilla").
        layer_index: 0-based index of this block.

    Example:
    ```python
    cfg = ViTConfig.from_variant("S/4", image_size=32, block="vanilla",
                                 posemb="sincos2d", pooling="gap")
    block = VanillaBlock(cfg, layer_index=0, name="encoder_block_0")
    block(keras.ops.ones((2, 64, 384))).shape  # (2, 64, 384)
    ```
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.layer_index = layer_index
        self.attention = ESPAAttention(config.num_heads, layer_index, config.depth,
                                       qkv_bias=config.qkv_bias, name="attention",
                                       dtype=self.dtype_policy)
        self.mlp = TATMLP(config.mlp_dim, tat_slope(config.depth), use_bias=config.mlp_bias,
                          name="mlp", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.attention.build(input_shape)
        self.mlp.build(input_shape)

    def call(self, x):
        return self.mlp(self.attention(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "layer_index": self.layer_index}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["config"] = ViTConfig.from_dict(config["config"])
        return cls(**config)
