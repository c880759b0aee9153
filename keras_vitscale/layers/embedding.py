"""Patch embedding (and its initializer for vanilla models), class and register
tokens, position embeddings (learned, sincos2d)."""

import math

import keras
import numpy as np
from keras import ops

from keras_vitscale.layers.dense import project


class PatchEmbedding(keras.layers.Layer):
    """Cuts images into patches and projects each to `width`.

    Equivalent to a convolution with kernel = stride = patch and VALID
    padding; the kernel keeps the convolution's (ph, pw, C, D) shape so that
    checkpoints convert directly, but runs as one rank-2 matmul.

    Args:
        width: output token width.
        patch_size: (ph, pw).
        kernel_initializer: Keras initializer for the kernel.
        use_bias: add a bias (OpenCLIP image towers have none).
    """

    def __init__(self, width, patch_size, kernel_initializer="lecun_normal", use_bias=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.patch_size = tuple(patch_size)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.use_bias = use_bias

    def build(self, input_shape):
        ph, pw = self.patch_size
        self.kernel = self.add_weight(
            name="kernel", shape=(ph, pw, input_shape[-1], self.width),
            initializer=self.kernel_initializer)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.width,), initializer="zeros")

    def call(self, images):
        _, height, width, channels = ops.shape(images)
        ph, pw = self.patch_size
        gh, gw = height // ph, width // pw
        x = ops.reshape(images, (-1, gh, ph, gw, pw, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        x = ops.reshape(x, (-1, gh * gw, ph * pw * channels))
        kernel = ops.reshape(self.kernel, (ph * pw * channels, self.width))
        return project(x, kernel, self.bias)

    def compute_output_shape(self, input_shape):
        ph, pw = self.patch_size
        return (input_shape[0], (input_shape[1] // ph) * (input_shape[2] // pw), self.width)


def vanilla_patch_initializer(config):
    """normal(0, variance 1 / patch_dim): the patch kernel of a vanilla model.

    A model without normalisation (block "vanilla", SimplEsT-ViT) needs its
    first layer to keep the pixels' scale; patch_dim = ph * pw * C is the
    fan-in of the (ph, pw, C, D) kernel, and the SimplEsT-ViT repository uses
    std = patch_dim ** -0.5, i.e. variance 1 / patch_dim.

    Args:
        config: the model's `ViTConfig`.

    Returns:
        A `keras.initializers.RandomNormal`.

    Example:
    ```python
    cfg = ViTConfig.from_variant("S/4", image_size=32, block="vanilla",
                                 posemb="sincos2d", pooling="gap")
    PatchEmbedding(cfg.width, cfg.patch_size,
                   kernel_initializer=vanilla_patch_initializer(cfg))
    ```
    """
    ph, pw = config.patch_size
    return keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(ph * pw * config.in_channels))


class ClassToken(keras.layers.Layer):
    """Prepends a learned token (initialised to zeros) to the sequence."""

    def build(self, input_shape):
        self.token = self.add_weight(name="token", shape=(1, 1, input_shape[-1]),
                                     initializer="zeros")

    def call(self, x):
        token = ops.broadcast_to(ops.cast(self.token, x.dtype),
                                 (ops.shape(x)[0], 1, ops.shape(x)[-1]))
        return ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + 1, input_shape[2])


class RegisterTokens(keras.layers.Layer):
    """Prepends `count` learned register tokens (Darcet et al. 2024).

    Applied before `ClassToken`, so the sequence reads [class, registers...,
    patches] as in timm and DINOv2.

    Initialised normal(std 1e-6), as DINOv2, not zeros: registers share no
    position, so equal registers would get equal gradients and stay equal.

    Args:
        count: number of register tokens.

    Example:
    ```python
    registers = RegisterTokens(4, name="register_tokens")
    registers(keras.ops.ones((2, 16, 32))).shape  # (2, 20, 32)
    ```
    """

    def __init__(self, count, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    def build(self, input_shape):
        self.tokens = self.add_weight(
            name="tokens", shape=(1, self.count, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=1e-6))

    def call(self, x):
        tokens = ops.broadcast_to(ops.cast(self.tokens, x.dtype),
                                  (ops.shape(x)[0], self.count, ops.shape(x)[-1]))
        return ops.concatenate([tokens, x], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + self.count
        return (input_shape[0], length, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "count": self.count}


class LearnedPositionEmbedding(keras.layers.Layer):
    """Adds a learned (1, length, D) embedding, normal(std 1/sqrt(D)) init."""

    def build(self, input_shape):
        length, width = input_shape[1], input_shape[2]
        self.embedding = self.add_weight(
            name="embedding", shape=(1, length, width),
            initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(width)))

    def call(self, x):
        return x + ops.cast(self.embedding, x.dtype)


class SinCos2DPositionEmbedding(keras.layers.Layer):
    """Adds big_vision's fixed 2D sine-cosine embedding (no weights).

    Args:
        grid_size: (rows, columns) of patches.
        temperature: the 10000 of the frequency ladder.
    """

    def __init__(self, grid_size, temperature=10_000.0, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(grid_size)
        self.temperature = temperature

    def build(self, input_shape):
        # A constant, computed once in numpy (float64) and frozen.
        self.table = sincos2d_table(self.grid_size, input_shape[-1], self.temperature)[None]

    def call(self, x):
        return x + ops.cast(self.table, x.dtype)


def sincos2d_table(grid_size, width, temperature=10_000.0):
    """(rows*cols, width) table: [sin(x w), cos(x w), sin(y w), cos(y w)].

    x is the column index and y the row index in raster order; w_i =
    1 / temperature^(i / (width/4 - 1)), as big_vision's posemb_sincos_2d.
    """
    rows, cols = grid_size
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    quarter = width // 4
    omega = np.arange(quarter) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype("float32")


def resample_grid(embedding, old_grid, new_grid, method="linear"):
    """Resizes a (1, [prefix +] rows*cols, D) position embedding to a new grid.

    Args:
        embedding: numpy array (1, L, D); L = prefix + rows*cols where the
            prefix tokens (a class token's position) are kept unchanged.
        old_grid, new_grid: (rows, cols).
        method: "linear" (big_vision: scipy.ndimage.zoom order 1, corners
            aligned) or "bicubic" (timm: bicubic with antialiasing).

    Returns:
        numpy array (1, prefix + new rows*cols, D).
    """
    embedding = np.asarray(embedding, dtype="float32")
    prefix = embedding.shape[1] - old_grid[0] * old_grid[1]
    if prefix < 0:
        raise ValueError(
            f"position embedding of length {embedding.shape[1]} cannot hold a "
            f"{old_grid[0]}x{old_grid[1]} grid.")
    head, grid = embedding[:, :prefix], embedding[0, prefix:]
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    if method == "linear":
        grid = _linear_align_corners(grid, 0, new_grid[0])
        grid = _linear_align_corners(grid, 1, new_grid[1])
    elif method == "bicubic":
        grid = _bicubic_antialias(grid, 0, new_grid[0])
        grid = _bicubic_antialias(grid, 1, new_grid[1])
    else:
        raise ValueError(f"Unknown resample method {method!r}; use 'linear' or 'bicubic'.")
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([head, grid.astype("float32")], axis=1)


def _linear_align_corners(array, axis, new_size):
    """Linear interpolation along one axis; output i samples i*(n-1)/(m-1)."""
    old_size = array.shape[axis]
    if old_size == new_size:
        return array
    if old_size == 1 or new_size == 1:
        positions = np.zeros(new_size)
    else:
        positions = np.arange(new_size) * (old_size - 1) / (new_size - 1)
    low = np.clip(np.floor(positions).astype(int), 0, old_size - 1)
    high = np.clip(low + 1, 0, old_size - 1)
    frac = (positions - low).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.take(array, low, axis) * (1 - frac) + np.take(array, high, axis) * frac


def _cubic(x, a=-0.5):
    # Keys' cubic kernel with a = -0.5: the antialiased (PIL-style) bicubic
    # that PyTorch runs for timm's resample_abs_pos_embed uses this value.
    x = np.abs(x)
    return np.where(
        x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _bicubic_antialias(array, axis, new_size):
    """Bicubic resize along one axis, half-pixel centres, antialiased when
    shrinking (the kernel is stretched by the scale and renormalised)."""
    old_size = array.shape[axis]
    if old_size == new_size:
        return array
    scale = old_size / new_size
    support = 2.0 * max(scale, 1.0)
    stretch = max(scale, 1.0)
    centres = (np.arange(new_size) + 0.5) * scale
    weights = np.zeros((new_size, old_size))
    for i, centre in enumerate(centres):
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), old_size)
        taps = np.arange(lo, hi)
        w = _cubic((taps + 0.5 - centre) / stretch)
        weights[i, lo:hi] = w / w.sum()
    moved = np.moveaxis(array, axis, 0)
    out = np.tensordot(weights, moved, axes=(1, 0))
    return np.moveaxis(out, 0, axis)
