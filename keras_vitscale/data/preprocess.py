"""Per-example image preprocessing: inception crop, flip, resize, central crop.

Images travel as float32 in [0, 255] until `to_unit_range` maps them to
[-1, 1] (big_vision's `value_range(-1, 1)`), so the Keras augmentation
layers, which default to a [0, 255] value range, see what they expect.
Every random op is stateless and keyed by a (seed, example position) pair:
the same example at the same position of the run always gets the same crop,
which is what makes a resumed run repeat an uninterrupted one exactly.
"""

import tensorflow as tf


def example_seed(seed, position, salt):
    """A stateless-op seed from the run seed, the example's position and a salt.

    Args:
        seed: the run seed (int).
        position: the example's position in the stream (int64 tensor).
        salt: distinguishes the ops applied to one example (crop, flip...).
    """
    mixed = tf.cast(position, tf.int64) * 7919 + salt
    return tf.stack([tf.cast(seed, tf.int64), mixed])


def to_float_rgb(image):
    """uint8 or float (H, W, 1|3) -> float32 (H, W, 3) in [0, 255]."""
    image = tf.cast(image, tf.float32)
    if image.shape[-1] == 1:  # grayscale sources become RGB for the ViT stem
        image = tf.image.grayscale_to_rgb(image)
    return image


def inception_crop(image, size, seed, area_min=0.05, area_max=1.0):
    """Random area/aspect crop resized to `size` (the "Inception" crop).

    Args:
        image: (H, W, 3) float image.
        size: (height, width) output size.
        seed: a stateless seed, shape (2,).
        area_min, area_max: bounds on the crop's fraction of the image area.
    """
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        area_range=(area_min, area_max), aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, size, method="bilinear", antialias=True)


def random_flip(image, seed):
    """Left-right flip with probability 1/2, stateless."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def resize_central_crop(image, size, crop_fraction=0.875):
    """Resize so the central `crop_fraction` of the image becomes `size`.

    big_vision's eval preprocessing is resize_small(size / 0.875) then
    central_crop(size); `crop_fraction=1.0` is a plain resize.
    """
    size = tf.constant(size, tf.int32)
    if crop_fraction >= 1.0:
        return tf.image.resize(image, size, method="bilinear", antialias=True)
    shape = tf.shape(image)[:2]
    # Scale the short side to size / crop_fraction, keep the aspect ratio.
    target = tf.cast(tf.reduce_max(size), tf.float32) / crop_fraction
    scale = target / tf.cast(tf.reduce_min(shape), tf.float32)
    new = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), size)
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top = (new[0] - size[0]) // 2
    left = (new[1] - size[1]) // 2
    return tf.slice(image, [top, left, 0], [size[0], size[1], 3])


def to_unit_range(image):
    """[0, 255] -> [-1, 1], clipped (bilinear resizes may overshoot a little)."""
    return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)
