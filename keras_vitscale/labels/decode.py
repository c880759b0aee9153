"""decode_predictions: a classifier's logits -> the top classes' names."""

import numpy as np

from keras_vitscale.labels.imagenet import (ALIASES, LABEL_SETS, imagenet_labels,
                                            resolve_label_set)

ACTIVATIONS = ("softmax", "sigmoid")


def _to_numpy(logits):
    # Any backend's tensor: torch's need detaching (and bfloat16 has no numpy
    # dtype there); numpy, JAX and TensorFlow arrays convert directly.
    if hasattr(logits, "detach") and hasattr(logits, "cpu"):
        logits = logits.detach().cpu().float().numpy()
    return np.asarray(logits).astype(np.float64)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _label_set_and_activation(source):
    """(label set, default activation) of a label set name or a preset handle."""
    if source in LABEL_SETS or source in ALIASES:
        return resolve_label_set(source), "softmax"
    # Imported here: only a handle needs the checkpoint facts (and the Hub
    # client behind them).
    from keras_vitscale import pretrained

    try:
        info = pretrained.labels_for(source)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{source!r} is neither a label set ({sorted(LABEL_SETS)}) nor a "
                         f"preset handle with a classifier: {error}") from error
    if info.get("label_set") is None:
        raise ValueError(
            f"{source!r} has no class labels: it names no checkpoint with a classifier over "
            "a known label set (a features-only or projection checkpoint, or a preset "
            "without published weights), so there is nothing to decode. Use its outputs "
            f"as features, or pass the label set ({sorted(LABEL_SETS)}) of a head you "
            "trained.")
    return resolve_label_set(info["label_set"]), info.get("activation") or "softmax"


def decode_predictions(logits, source, top=5, activation=None):
    """The `top` classes of each image: (synset, name, probability), best first.

    Args:
        logits: (batch, classes) or (classes,) logits of an ImageNet head: a
            numpy array or any backend's tensor. A 1-D input is one image.
        source: a preset handle ("vit_b16.augreg_in21k", ...), whose label
            set and activation are used, or a label set name ("imagenet-1k",
            "imagenet-21k", "imagenet-12k"), whose activation defaults to
            softmax.
        top: how many classes per image (at most the number of classes).
        activation: "softmax" or "sigmoid" to override the head's own (in21k
            heads trained with a sigmoid loss give independent probabilities).

    Returns:
        One list per image of `top` (synset, name, probability) tuples,
        highest probability first (equal ones by class index).

    Example:
    ```python
    logits = model(prep(images))
    kvs.decode_predictions(logits, "vit_b16.augreg2_in21k_ft_in1k", top=3)
    # [[("n02123045", "tabby, tabby cat", 0.71), ...], ...]
    ```
    """
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top={top!r}: expected a whole number >= 1 of classes to return.")
    label_set, default = _label_set_and_activation(source)
    activation = activation or default
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}.")
    z = _to_numpy(logits)
    if z.ndim == 1:
        z = z[None]
    labels = imagenet_labels(label_set)
    if z.ndim != 2:
        raise ValueError(f"logits of shape {z.shape}: expected (batch, {len(labels)}) "
                         f"or one image's ({len(labels)},).")
    if z.shape[-1] != len(labels):
        raise ValueError(
            f"logits have {z.shape[-1]} classes but label set {label_set!r} has "
            f"{len(labels)}; pass the label set of the head that made them (sizes: "
            f"{LABEL_SETS}) or the preset handle the model was loaded from.")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinity; check the model's output "
                         "(a float16 overflow?) before decoding.")
    probabilities = _softmax(z) if activation == "softmax" else _sigmoid(z)
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top]
    return [[(*labels[i], float(p[i])) for i in row] for p, row in zip(probabilities, order)]
