"""FlexiViT's PI-resize: change a trained model's patch size (Beyer et al. 2023).

A patch x of (ph, pw) pixels that is upsampled bilinearly to (h, w) becomes
B x, with B the (h*w, ph*pw) bilinear resize matrix (per channel). Choosing
the new kernel w' = pinv(B^T) w keeps the token unchanged:
<B x, w'> = <x, B^T pinv(B^T) w> = <x, w> whenever B has full column rank,
which holds when upsampling (h >= ph and w >= pw). When downsampling, w' is
the least-squares solution instead of an exact one.
"""

import logging

import numpy as np

from keras_vitscale.config import _pair

logger = logging.getLogger("keras_vitscale")


def bilinear_resize_matrix(old_size, new_size):
    """The (new_size, old_size) matrix of a 1-D half-pixel bilinear resize.

    Matches `tf.image.resize(..., method="bilinear", antialias=False)`
    (half-pixel centres, corners not aligned, edges clamped), which is what
    the data pipelines do when they upsample (antialiasing only changes
    downsampling).

    Example:
    ```python
    bilinear_resize_matrix(2, 4) @ np.array([0.0, 1.0])   # [0, .25, .75, 1]
    ```
    """
    positions = (np.arange(new_size) + 0.5) * (old_size / new_size) - 0.5
    positions = np.clip(positions, 0, old_size - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, old_size - 1)
    frac = positions - low
    matrix = np.zeros((new_size, old_size))
    rows = np.arange(new_size)
    # np.add.at: low and high coincide at the clamped edges.
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def bilinear_resize_2d(old_size, new_size):
    """The (h*w, ph*pw) matrix resizing a row-major flattened (ph, pw) patch."""
    (ph, pw), (h, w) = _pair(old_size, "old patch size"), _pair(new_size, "new patch size")
    return np.kron(bilinear_resize_matrix(ph, h), bilinear_resize_matrix(pw, w))


def pi_resize_patch_kernel(kernel, new_patch):
    """PI-resizes a patch-embedding kernel to a new patch size.

    Args:
        kernel: numpy array (ph, pw, C, D), the `PatchEmbedding` kernel.
        new_patch: int or (h, w).

    Returns:
        float32 numpy array (h, w, C, D) such that for every patch x,
        <bilinear_resize(x), new kernel> == <x, kernel> (exact when
        upsampling, least squares when downsampling).

    Example:
    ```python
    kernel = model.get_layer("patch_embedding").kernel.numpy()   # (16, 16, 3, D)
    pi_resize_patch_kernel(kernel, 24).shape                       # (24, 24, 3, D)
    ```
    """
    kernel = np.asarray(kernel, dtype="float64")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be (ph, pw, C, D); got shape {kernel.shape}.")
    ph, pw, channels, width = kernel.shape
    h, w = _pair(new_patch, "new_patch")
    if (h, w) == (ph, pw):
        return kernel.astype("float32")
    resize = bilinear_resize_2d((ph, pw), (h, w))
    flat = kernel.reshape(ph * pw, channels * width)
    new = np.linalg.pinv(resize.T) @ flat
    return new.reshape(h, w, channels, width).astype("float32")


def resize_patch(model, new_patch, image_size=None, resample="linear"):
    """A copy of a ViT with another patch size: PI-resized kernel, same weights.

    The patch grid changes with the patch size, so a learned position
    embedding is resampled to the new grid (as `from_preset` does for a new
    image size).

    Args:
        model: a `kvs.ViT`.
        new_patch: int or (h, w); must divide the image size.
        image_size: int or (h, w) of the new model (default: the model's).
        resample: "linear" or "bicubic" position-embedding resampling.

    Returns:
        A new `kvs.ViT` of the same class.

    Example:
    ```python
    model = kvs.ViT.from_preset("runs/digits/model")           # patch 8, 32x32
    model = resize_patch(model, 4, image_size=48)               # grid 12x12
    ```
    """
    from keras_vitscale.layers.embedding import resample_grid

    config = model.config
    patch = _pair(new_patch, "new_patch")
    size = config.image_size if image_size is None else _pair(image_size, "image_size")
    if size[0] % patch[0] or size[1] % patch[1]:
        divisors = [p for p in range(1, size[0] + 1) if size[0] % p == 0 and size[1] % p == 0]
        raise ValueError(
            f"--resize-patch {patch[0] if patch[0] == patch[1] else patch} does not divide "
            f"the image size {size[0]}x{size[1]}; pick a patch size that divides it "
            f"(one of {divisors}) or change --image-size.")
    target = type(model)(config=config.replace(patch_size=patch, image_size=size),
                         dtype=model.dtype_policy)
    source_vars = {v.path: v for v in model.weights}
    for variable in target.weights:
        value = np.asarray(source_vars[variable.path].numpy())
        if variable.path == "patch_embedding/kernel":
            value = pi_resize_patch_kernel(value, patch)
        elif (variable.path.startswith("position_embedding/")
              and value.shape != tuple(variable.shape)):
            value = resample_grid(value, config.grid_size, target.config.grid_size,
                                  method=resample)
        variable.assign(value)
    logger.warning("PI-resized the patch embedding from %s to %s; grid %s -> %s.",
                   config.patch_size, patch, config.grid_size, target.config.grid_size)
    return target
