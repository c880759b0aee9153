"""tf.data pipelines: a resumable, seeded training stream and an eval stream.

Training: example positions 0, 1, 2, ... of an endless stream; epoch e is a
permutation of the split seeded by (seed, e). Each example's crop and flip
are seeded by (seed, position). A run that restarts at step s builds the
stream from position s * global_batch and reproduces the same batches.
In a multi-host run each host keeps positions p with p % hosts == host
(tf.data shard by process index) and batches batch_size / hosts of them.
Evaluation is a fixed order, padded to whole batches and sharded the same
way, so the hosts together see every held-out example exactly once.
"""

import numpy as np
import tensorflow as tf

from keras_vitscale.data import augment as augment_lib
from keras_vitscale.data import preprocess as pp
from keras_vitscale.data.sources import IndexedSplit

AUTOTUNE = tf.data.AUTOTUNE
TRAIN_CROPS = ("inception", "resize")


def _positions(split, seed, start):
    """(position, index) pairs from `start` on, for an indexed split."""
    n = split.size
    first_epoch, offset = divmod(start, n)

    def epoch(e):
        order = tf.argsort(tf.random.stateless_uniform([n], tf.stack([tf.cast(seed, tf.int64), e])))
        return tf.data.Dataset.from_tensor_slices(tf.cast(order, tf.int64))

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    return ds.enumerate(start=first_epoch * n).skip(offset)


def train_dataset(source, batch_size, image_size, seed, start_step=0, crop=None,
                  flip=None, augment=None, label_smoothing=0.0, process_index=0,
                  process_count=1):
    """The endless training stream of (images, one-hot labels) batches.

    Args:
        source: a `Source` from `load_source`.
        batch_size: the global batch size (all hosts together).
        image_size: (h, w).
        seed: the run seed.
        start_step: first step of this run (resume point).
        crop: "inception" or "resize"; None picks "inception" for natural
            images and "resize" for digits-like sources.
        flip: random left-right flips; None means on for natural images.
        augment: Keras augmentation spec, e.g. "randaugment:10,mixup:0.2".
        label_smoothing: mass spread uniformly over all classes.
        process_index, process_count: this host and the number of hosts.

    Returns:
        A `tf.data.Dataset` of (float32 images in [-1, 1] (B, h, w, 3),
        float32 labels (B, num_classes)), B = batch_size / process_count.

    Example:
    ```python
    ds = train_dataset(load_source("digits"), batch_size=64, image_size=(32, 32), seed=0)
    images, labels = next(iter(ds))
    ```
    """
    crop = crop or ("inception" if source.natural_images else "resize")
    if crop not in TRAIN_CROPS:
        raise ValueError(f"Unknown train crop {crop!r}; use one of {TRAIN_CROPS}.")
    flip = source.natural_images if flip is None else flip
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} "
                         f"hosts; use a multiple of {process_count}.")
    size = tuple(image_size)
    start = start_step * batch_size
    split = source.train
    if isinstance(split, IndexedSplit):
        ds = _positions(split, seed, start)
        ds = ds.shard(process_count, process_index)
        ds = ds.map(lambda p, i: (p, *split.load(i)), num_parallel_calls=AUTOTUNE)
    else:
        raw = split.make(seed, shuffle=True).repeat()
        raw = raw.shuffle(min(10_000, max(split.size, 1)), seed=seed)
        ds = raw.enumerate().skip(start).shard(process_count, process_index)
        ds = ds.map(lambda p, ex: (p, split.decode(ex[0]), ex[1]), num_parallel_calls=AUTOTUNE)

    def example(position, image, label):
        image = pp.to_float_rgb(image)
        if crop == "inception":
            image = pp.inception_crop(image, size, pp.example_seed(seed, position, 1))
        else:
            image = tf.image.resize(image, size, method="bilinear", antialias=True)
        if flip:
            image = pp.random_flip(image, pp.example_seed(seed, position, 2))
        return image, tf.one_hot(label, source.num_classes)

    ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    layers = augment_lib.build_layers(augment, seed=seed + 7 * start_step)

    def finish(images, labels):
        images, labels = augment_lib.apply(layers, images, labels)
        if label_smoothing:
            labels = labels * (1.0 - label_smoothing) + label_smoothing / source.num_classes
        return pp.to_unit_range(images), labels

    # The Keras layers are stateful (seed generators): run them sequentially
    # so their draws happen in batch order.
    ds = ds.map(finish, num_parallel_calls=None if layers else AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(source, batch_size, image_size, crop_fraction=None, one_hot=True,
                 pad_to_batch=False, split=None, process_index=0, process_count=1):
    """The held-out split in a fixed order: resize + central crop, [-1, 1].

    Args:
        source: a `Source`.
        batch_size: the global batch size (all hosts together).
        image_size: (h, w).
        crop_fraction: central crop fraction; None uses the source's (0.875,
            or 1.0 for digits).
        one_hot: one-hot float labels (for `model.evaluate`) or int labels
            (for feature extraction).
        pad_to_batch: pad the split to a whole number of batches with blank,
            zero-weight examples and yield (images, labels, weights); needed
            when the batch is split over devices. Real examples weigh
            padded size / size: Keras divides a batch's weighted loss by the
            whole batch, padding included, so this makes `val_loss` the mean
            over the real examples (weighted accuracy is unchanged).
        split: another split of the source to read, e.g. `source.train`
            (few-shot features); defaults to the held-out split.
        process_index, process_count: this host and the number of hosts.
            With several hosts each reads examples i with i % hosts == host
            (pad_to_batch is required), so every host runs the same number
            of batches of batch_size / hosts, and the global batch k holds
            examples k * batch_size ... (k + 1) * batch_size - 1 exactly as
            on one host: every example is evaluated once.

    Example:
    ```python
    ds = eval_dataset(load_source("digits"), 128, (32, 32))
    ```
    """
    split = source.held_out if split is None else split
    fraction = source.eval_crop_fraction if crop_fraction is None else crop_fraction
    size = tuple(image_size)
    if process_count > 1 and not pad_to_batch:
        raise ValueError(f"eval_dataset over {process_count} hosts needs pad_to_batch=True "
                         "(every host must run the same number of batches).")
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} "
                         f"hosts; use a multiple of {process_count}.")
    # Items are decoded only after the per-host shard, so no host decodes
    # the others' examples.
    if isinstance(split, IndexedSplit):
        items = tf.data.Dataset.range(split.size).map(lambda i: ((i,), 1.0))
        load = split.load
    else:
        items = split.make(0, shuffle=False).map(lambda r, y: ((r, y), 1.0))
        load = lambda r, y: (split.decode(r), y)  # noqa: E731
    if pad_to_batch:
        pad = (-split.size) % batch_size
        if pad:
            weight = (split.size + pad) / split.size
            items = items.map(lambda item, w: (item, w * weight))
            blank = items.take(1).map(lambda item, w: (item, 0.0)).repeat(pad)
            items = items.concatenate(blank)
    items = items.shard(process_count, process_index)

    def example(item, weight):
        image, label = load(*item)
        image = pp.resize_central_crop(pp.to_float_rgb(image), size, fraction)
        label = tf.one_hot(label, source.num_classes) if one_hot else label
        image = pp.to_unit_range(image)
        if not pad_to_batch:
            return image, label
        # Padding is blank as well as weightless.
        real = tf.cast(weight > 0, tf.float32)
        return image * real, label * tf.cast(real, label.dtype), weight

    ds = items.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size // process_count).prefetch(AUTOTUNE)
