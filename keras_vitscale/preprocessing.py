"""ImagePreprocessor: a checkpoint's evaluation transform as a Keras layer.

It reproduces timm's eval transform (`timm.data.resolve_data_config` +
`create_transform`), which runs PIL on uint8 images: resize (shorter side to
size / crop_pct, or both sides for "squash"), centre crop, then
(x / 255 - mean) / std. Keras' and the backends' resize functions differ from
PIL and from each other (torch's bicubic uses a = -0.75, PIL's a = -0.5), so
the resize is done here as two weight-matrix products computed in numpy for
the input's static size: PIL's own filters, antialiased when downscaling
(support stretched by the scale factor), with half-pixel centres, width pass
first. The same weights run on every backend, and integer images are rounded
and clipped to 0..255 after each pass as PIL does. The crop only selects
output rows and columns, so it is folded into the matrices.
"""

import math

import keras
import numpy as np
from keras import ops

# timm's defaults for a pretrained_cfg key that is absent (resolve_data_config).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875

CROP_MODES = ("center", "squash", "border")


def _bicubic(x):  # Keys' cubic with PIL's a = -0.5
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# PIL's resampling filters (Resample.c): name -> (support at scale 1, kernel).
# np.sinc is the normalised sinc, sin(pi x) / (pi x), as PIL's.
FILTERS = {
    "bicubic": (2.0, _bicubic),
    "bilinear": (1.0, lambda x: np.maximum(1.0 - np.abs(x), 0.0)),
    "box": (0.5, lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64)),
    "hamming": (1.0, lambda x: np.where(
        np.abs(x) < 1.0, np.sinc(x) * (0.54 + 0.46 * np.cos(np.pi * x)), 0.0)),
    "lanczos": (3.0, lambda x: np.where(
        (x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)),
}
INTERPOLATIONS = ("nearest", *FILTERS)

# PIL computes uint8 passes in fixed point with 22 fractional bits.
_PRECISION_BITS = 22


def resize_matrix(in_size, out_size, interpolation, quantize=False):
    """PIL's resampling along one axis as a dense (out_size, in_size) matrix.

    Args:
        in_size, out_size: lengths of the axis before and after.
        interpolation: one of INTERPOLATIONS.
        quantize: round the weights to PIL's fixed-point precision (its uint8
            path), so sums land on the same side of a rounding boundary.

    Example:
    ```python
    resize_matrix(640, 371, "bicubic") @ row   # a row of 640 pixels -> 371
    ```
    """
    matrix = np.zeros((out_size, in_size))
    scale = in_size / out_size
    if interpolation == "nearest":
        # PIL's affine nearest: source = floor(centre), centres accumulated by
        # repeated addition as in its C loop (the rounding of that sum decides
        # ties, so it is repeated exactly).
        centre = 0.5 * scale
        for i in range(out_size):
            matrix[i, min(int(centre), in_size - 1)] = 1.0
            centre += scale
        return matrix
    support, kernel = FILTERS[interpolation]
    filter_scale = max(scale, 1.0)  # stretch the kernel when downscaling: antialias
    support *= filter_scale
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        weights = kernel((np.arange(lo, hi) - centre + 0.5) / filter_scale)
        total = weights.sum()
        matrix[i, lo:hi] = weights / total if total != 0.0 else weights
    if quantize:
        one = float(1 << _PRECISION_BITS)
        matrix = np.trunc(matrix * one + np.copysign(0.5, matrix)) / one
    return matrix


def _torchvision_round(x):
    return int(round(x))  # Python's round: halves to even, as torchvision's CenterCrop


def _crop_or_pad(matrix, out_size):
    """Rows of a resize matrix kept by a centre crop to `out_size`, and a mask.

    A centre crop takes rows from round((n - out) / 2); where the resized
    axis is shorter, it is padded by (out - n) // 2 rows first (torchvision's
    CenterCrop and timm's CenterCropOrPad). Padded rows are all-zero; the
    mask (out_size,) is 1 on real rows.
    """
    n = matrix.shape[0]
    if n >= out_size:
        top = _torchvision_round((n - out_size) / 2.0)
        return matrix[top:top + out_size], np.ones(out_size)
    before = (out_size - n) // 2
    padded = np.zeros((out_size, matrix.shape[1]))
    padded[before:before + n] = matrix
    mask = np.zeros(out_size)
    mask[before:before + n] = 1.0
    return padded, mask


def resized_size(height, width, image_size, crop_pct, crop_mode):
    """(height, width) of the resized image before the crop, by timm's rules.

    Args:
        height, width: the input image's size.
        image_size: (height, width) of the crop.
        crop_pct: the crop's fraction of the resized image.
        crop_mode: one of CROP_MODES.

    Example:
    ```python
    resized_size(427, 640, (224, 224), 0.9, "center")   # (248, 371)
    ```
    """
    scale = tuple(math.floor(s / crop_pct) for s in image_size)
    if crop_mode == "squash":
        return scale
    if crop_mode == "center" and scale[0] == scale[1]:
        # torchvision's Resize(int): shorter side exact, longer side truncated.
        short, long = sorted((height, width))
        new_long = int(scale[0] * long / short)
        return (scale[0], new_long) if height <= width else (new_long, scale[0])
    # timm's ResizeKeepRatio: the shorter side ("center") or the longer side
    # ("border") fits its target; both sides rounded.
    ratios = (height / scale[0], width / scale[1])
    ratio = max(ratios) if crop_mode == "border" else min(ratios)
    return round(height / ratio), round(width / ratio)


def _nonzero_span(matrix):
    """[first, last + 1) of the columns with a nonzero weight."""
    used = np.flatnonzero(np.any(matrix != 0.0, axis=0))
    return int(used[0]), int(used[-1]) + 1


def _split(matrix, exact):
    """float32 (high, low) parts of resize weights; low is None unless `exact`.

    GPUs multiply float32 in TF32 by default (JAX, TensorFlow) and TPUs in
    bfloat16: integer pixel values survive that, the weights do not. Split
    into a bfloat16-exact part and the float32 remainder, they give
    float32-accurate sums, so uint8 images round as PIL's do on every device.
    """
    weights = matrix.astype(np.float32)
    if not exact:
        return weights, None
    high = ((weights.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)
    return high, weights - high


def _product(equation, x, parts):
    high, low = parts
    y = ops.einsum(equation, x, ops.convert_to_tensor(high, "float32"))
    if low is not None:
        y = y + ops.einsum(equation, x, ops.convert_to_tensor(low, "float32"))
    return y


def _is_identity(matrix):
    return matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(len(matrix)))


@keras.saving.register_keras_serializable(package="keras_vitscale")
class ImagePreprocessor(keras.layers.Layer):
    """A checkpoint's evaluation preprocessing: resize, centre crop, normalise.

    Equal (within one uint8 level per resize pass) to timm's eval transform
    on the same settings, on every backend. Input: one image (H, W, C) or a
    batch (B, H, W, C) of any size, C = 3 (RGB) or 1 (grayscale, repeated to
    RGB). Integer images are pixel values 0..255 and are rounded and clipped
    to 0..255 after each resize pass, as PIL does with uint8 images; float
    images are taken as 0..`input_scale` (default 255, the uint8 scale; pass
    1.0 for images in 0..1) and are neither rounded nor clipped, as PIL does
    with float ("F") images. Output: float32 (B, height, width, 3), or
    (height, width, 3) for one image, normalised as (x / 255 - mean) / std.

    The resize weights depend on the input's height and width, which must be
    known when the layer is called: always so on JAX and torch and eagerly on
    TensorFlow; in a tf.data map (TensorFlow backend) images of unknown size
    are handled by a `tf.numpy_function` that computes the weights per image.

    Args:
        image_size: output (height, width), or one int for a square.
        crop_pct: the crop's fraction of the resized image: the shorter side
            is resized to floor(size / crop_pct) (timm's crop_pct).
        crop_mode: "center" (keep the aspect ratio, crop the centre),
            "squash" (resize both sides to floor(size / crop_pct), ignoring
            the aspect ratio, then crop), or "border" (fit the longer side,
            pad with the mean colour, as timm's "border").
        interpolation: PIL's filter: "bicubic", "bilinear", "nearest",
            "box", "hamming" or "lanczos".
        mean, std: per-channel normalisation, on the 0..1 scale.
        input_scale: the value of white in float inputs (255.0 or 1.0).

    Example:
    ```python
    prep = kvs.ImagePreprocessor(image_size=224, crop_pct=0.9,
                                 mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = prep(images_uint8)          # (B, 224, 224, 3) float32
    prep = kvs.ImagePreprocessor.from_preset("vit_b16")
    ```
    """

    def __init__(self, image_size=(224, 224), crop_pct=DEFAULT_CROP_PCT, crop_mode="center",
                 interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                 std=IMAGENET_DEFAULT_STD, input_scale=255.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        # Autocasting would turn float images into a mixed policy's float16
        # before the resize; the layer casts by itself.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = tuple(int(s) for s in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size={image_size!r}: expected (height, width) of "
                             "positive ints, or one int for a square.")
        if not crop_pct or crop_pct <= 0:
            raise ValueError(f"crop_pct={crop_pct!r}: expected a fraction > 0, such as "
                             "0.875 (timm's default) or 1.0 (no crop).")
        self.crop_pct = float(crop_pct)
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode={crop_mode!r}: expected one of {CROP_MODES}.")
        self.crop_mode = crop_mode
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r}: expected one of "
                             f"{INTERPOLATIONS} (PIL's filters, as timm uses them).")
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={mean!r}, std={std!r}: expected three values each "
                             "(RGB, on the 0..1 scale), std > 0.")
        if input_scale not in (1.0, 255.0):
            raise ValueError(f"input_scale={input_scale!r}: expected 255.0 (float images "
                             "in 0..255, like uint8) or 1.0 (float images in 0..1).")
        self.input_scale = float(input_scale)
        # timm pads "border" crops with the mean colour, rounded to uint8.
        self._fill = np.asarray([round(255 * m) for m in self.mean], np.float32)

    @classmethod
    def from_config_dict(cls, config, **kwargs):
        """The preprocessor of a timm pretrained_cfg (or a dict with its keys).

        Args:
            config: a dict with timm's keys `input_size` ([3, H, W]),
                `crop_pct`, `crop_mode`, `interpolation`, `mean`, `std`; an
                absent key takes timm's default (resolve_data_config), other
                keys are ignored.
            **kwargs: passed to the constructor (`input_scale`, `name`...).

        Example:
        ```python
        cfg = timm.models.get_pretrained_cfg("vit_base_patch16_224.augreg_in21k")
        prep = ImagePreprocessor.from_config_dict(cfg.to_dict())
        ```
        """
        input_size = tuple(config.get("input_size") or (3, 224, 224))
        if len(input_size) != 3 or input_size[0] != 3:
            raise ValueError(f"input_size={input_size!r}: expected timm's [3, height, "
                             "width] (RGB channels first).")
        return cls(image_size=input_size[1:],
                   crop_pct=config.get("crop_pct") or DEFAULT_CROP_PCT,
                   crop_mode=config.get("crop_mode") or "center",
                   interpolation=config.get("interpolation") or "bicubic",
                   mean=config.get("mean") or IMAGENET_DEFAULT_MEAN,
                   std=config.get("std") or IMAGENET_DEFAULT_STD, **kwargs)

    @classmethod
    def from_preset(cls, handle, **kwargs):
        """The preprocessor a preset's checkpoint was evaluated with.

        Args:
            handle: a preset handle ("vit_b16.augreg2_in21k_ft_in1k", ...) or
                any handle `kvs.ViT.from_preset` takes with recorded
                preprocessing (`keras_vitscale.pretrained.preprocessing_for`).
            **kwargs: passed to the constructor (`input_scale`, `name`...).

        Example:
        ```python
        prep = kvs.ImagePreprocessor.from_preset("vit_so400m14_siglip_378.webli_ft_in1k")
        ```
        """
        # Imported here: only a handle needs the checkpoint facts (and the Hub
        # client behind them); the layer itself does not.
        from keras_vitscale import pretrained

        return cls.from_config_dict(pretrained.preprocessing_for(handle), **kwargs)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": self.mean, "std": self.std,
                "input_scale": self.input_scale}

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-3], *self.image_size, 3)

    def weights_for(self, height, width, quantize=False):
        """The resize-and-crop plan for one input size, in numpy.

        Returns:
            (rows, cols, mask): rows (out_h, height) and cols (out_w, width)
            weight matrices, and mask (out_h, out_w, 1), 1 where the output
            comes from the image and 0 where it is padding.
        """
        new_h, new_w = resized_size(height, width, self.image_size, self.crop_pct,
                                    self.crop_mode)
        rows, row_mask = _crop_or_pad(
            resize_matrix(height, new_h, self.interpolation, quantize), self.image_size[0])
        cols, col_mask = _crop_or_pad(
            resize_matrix(width, new_w, self.interpolation, quantize), self.image_size[1])
        return rows, cols, np.outer(row_mask, col_mask)[:, :, None]

    def call(self, images):
        rank = len(images.shape)
        if rank not in (3, 4):
            raise ValueError(
                f"ImagePreprocessor got images of shape {tuple(images.shape)} (rank {rank}); "
                "expected one image (H, W, C) or a batch (B, H, W, C). For a grayscale "
                "(H, W) image add a channel axis: image[..., None].")
        channels = images.shape[-1]
        if channels not in (1, 3):
            raise ValueError(
                f"ImagePreprocessor got {channels} channels (shape {tuple(images.shape)}); "
                "expected 3 (RGB) or 1 (grayscale). Drop an alpha channel with "
                "image[..., :3]; channels go last (H, W, C).")
        integer = "int" in keras.backend.standardize_dtype(images.dtype)
        x = ops.cast(images, "float32")
        if not integer and self.input_scale != 255.0:
            x = x * (255.0 / self.input_scale)
        height, width = images.shape[-3], images.shape[-2]
        if height is None or width is None:
            rows, cols, mask = self._dynamic_weights(images, integer)
            x = self._resize(x, rows, cols, integer)
        else:
            rows, cols, mask = self.weights_for(height, width, quantize=integer)
            x = self._resize_static(x, rows, cols, integer)
        if channels == 1:  # PIL's "L" -> "RGB" repeats the gray value
            x = ops.repeat(x, 3, axis=-1)
        if self.crop_mode == "border":  # other modes pad with 0 (torchvision's CenterCrop)
            x = x + (1.0 - ops.convert_to_tensor(mask, "float32")) * self._fill
        scale = np.asarray([1.0 / (255.0 * s) for s in self.std], np.float32)
        shift = np.asarray([m / s for m, s in zip(self.mean, self.std)], np.float32)
        return ops.cast(x * scale - shift, self.compute_dtype)

    def _resize_static(self, x, rows, cols, integer):
        # Only the input rows and columns some output pixel reads are used:
        # slicing them off first saves the products over the cropped-off parts.
        r0, r1 = _nonzero_span(rows)
        c0, c1 = _nonzero_span(cols)
        x = x[..., r0:r1, c0:c1, :]
        rows, cols = rows[:, r0:r1], cols[:, c0:c1]
        cols = None if _is_identity(cols) else _split(cols, integer)
        rows = None if _is_identity(rows) else _split(rows, integer)
        return self._resize(x, rows, cols, integer)

    def _resize(self, x, rows, cols, integer):
        # Width first, as PIL, since the uint8 rounding in between matters.
        if cols is not None:
            x = self._per_pass(_product("...wc,ow->...oc", x, cols), integer)
        if rows is not None:
            x = self._per_pass(_product("...hwc,oh->...owc", x, rows), integer)
        return x

    def _per_pass(self, x, integer):
        # PIL rounds half up to uint8 and clips after each pass; its float
        # ("F") images keep the exact value, overshoot included.
        if not integer:
            return x
        return ops.clip(ops.floor(x + 0.5), 0.0, 255.0)

    def _dynamic_weights(self, images, integer):
        """Weights from a tf.numpy_function, for images of unknown size (tf.data)."""
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"ImagePreprocessor needs the images' height and width when it runs; got "
                f"shape {tuple(images.shape)}. Call it on the images themselves (or, on "
                "the TensorFlow backend, inside tf.data, where unknown sizes work).")
        import tensorflow as tf  # only reached on the TensorFlow backend

        def plan(height, width):
            rows, cols, mask = self.weights_for(int(height), int(width), quantize=integer)
            parts = []
            for matrix in (rows, cols):
                high, low = _split(matrix, integer)
                # A float image's "low" parts are unused zeros: one signature for both.
                parts += [high, np.zeros_like(high) if low is None else low]
            return (*parts, mask.astype(np.float32))

        shape = tf.shape(images)
        *parts, mask = tf.numpy_function(plan, [shape[-3], shape[-2]], [tf.float32] * 5,
                                         stateful=False)
        for part, size in zip(parts, (self.image_size[0],) * 2 + (self.image_size[1],) * 2):
            part.set_shape((size, None))
        mask.set_shape((*self.image_size, 1))
        rows = (parts[0], parts[1] if integer else None)
        cols = (parts[2], parts[3] if integer else None)
        return rows, cols, mask
