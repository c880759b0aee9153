"""Runs a model over a dataset and collects its outputs as numpy features.

Works on every Keras backend: a `keras.Model` goes through
`predict_on_batch` (compiled by the backend: jit on JAX, tf.function on
TensorFlow), anything else callable is called directly and its output
converted with `keras.ops.convert_to_numpy`.
"""

import keras
import numpy as np


def extract_features(model, dataset, batch_size=256, progress=True, output=None):
    """Returns (features, labels) as numpy arrays for a whole dataset.

    Args:
        model: a `keras.Model` (e.g. a `kvs.ViT` built with `num_classes=0`
            or a pre-logits sub-model) or any callable on an image batch.
        dataset: one of
            - a tuple `(images, labels)` of arrays, batched by `batch_size`;
            - an array of images alone (labels come back as None);
            - a `tf.data.Dataset` or any iterable (a torch DataLoader, a
              generator) of `(images, labels)` batches or of dicts with
              "image" and "label" keys (the TFDS convention).
        batch_size: batch size for arrays; iterables keep their own batching.
        progress: show a `keras.utils.Progbar`.
        output: key or index picking one output when the model returns a
            dict, list or tuple (e.g. "pre_logits").

    Returns:
        `(features, labels)`: features of shape (N, ...) in the model's
        output dtype, labels of shape (N, ...) or None.

    Example:
    >>> backbone = kvs.ViT(variant="S/16", num_classes=0)
    >>> x, y = extract_features(backbone, (images, labels), batch_size=64)
    >>> kvs.evaluation.fewshot(x[:1000], y[:1000], x[1000:], y[1000:])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    batches, total = _batches(dataset, batch_size)
    bar = keras.utils.Progbar(total, unit_name="example") if progress else None
    features, labels, seen = [], [], 0
    for images, batch_labels in batches:
        out = _call(model, images)
        if output is not None:
            out = out[output]
        elif isinstance(out, (dict, list, tuple)):
            raise ValueError(
                f"the model returned a {type(out).__name__} "
                f"({_describe(out)}); pass output=<key or index> to pick the "
                "features."
            )
        out = keras.ops.convert_to_numpy(out)
        features.append(out)
        if batch_labels is not None:
            labels.append(np.asarray(batch_labels))
        seen += len(out)
        if bar is not None:
            bar.update(seen)
    if not features:
        raise ValueError("the dataset yielded no batches; check that it is not empty.")
    if labels and len(labels) != len(features):
        raise ValueError(
            "some batches had labels and others did not; yield (images, "
            "labels) for every batch."
        )
    return np.concatenate(features), (np.concatenate(labels) if labels else None)


def _call(model, images):
    if isinstance(model, keras.Model):
        return model.predict_on_batch(images)
    if isinstance(model, keras.layers.Layer):
        return model(images, training=False)
    return model(images)


def _describe(out):
    if isinstance(out, dict):
        return f"keys {sorted(out)}"
    return f"{len(out)} entries"


def _split(batch):
    """Splits a batch into (images, labels or None)."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(
                f"dict batches need an 'image' key, got keys {sorted(batch)}; "
                "map the dataset to {'image': ..., 'label': ...} or (images, labels)."
            )
        return batch["image"], batch.get("label")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(
            f"a batch has {len(batch)} entries; yield (images, labels) pairs."
        )
    return batch, None


def _batches(dataset, batch_size):
    """Returns (iterator of (images, labels), number of examples or None)."""
    if isinstance(dataset, tuple) and len(dataset) == 2 and _is_array(dataset[0]):
        images, labels = dataset
        if labels is not None and len(labels) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(labels)} labels; pass one label "
                "per image."
            )
        return _array_batches(images, labels, batch_size), len(images)
    if _is_array(dataset):
        return _array_batches(dataset, None, batch_size), len(dataset)
    if hasattr(dataset, "as_numpy_iterator"):  # tf.data.Dataset
        iterator = dataset.as_numpy_iterator()
    else:
        iterator = iter(dataset)
    # The progress bar counts examples, but a batched dataset only knows its
    # number of batches (if that): show no target rather than a wrong one.
    return (_split(b) for b in iterator), None


def _array_batches(images, labels, batch_size):
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield images[start:stop], None if labels is None else labels[start:stop]


def _is_array(x):
    # numpy arrays and backend tensors; not lists (which may be lists of batches).
    return hasattr(x, "shape") and hasattr(x, "__getitem__") and hasattr(x, "__len__")
