"""ImageNet class names (against timm's ImageNetInfo) and decode_predictions."""

import keras
import numpy as np
import pytest
from timm.data import ImageNetInfo

from keras_vitscale import labels
from keras_vitscale.presets import registry

TIMM_NAMES = {"imagenet-1k": "imagenet-1k", "imagenet-12k": "imagenet-12k",
              "imagenet-21k": "imagenet-21k-goog"}


@pytest.mark.parametrize("label_set", sorted(TIMM_NAMES))
def test_labels_equal_timms_in_head_order(label_set):
    info = ImageNetInfo(TIMM_NAMES[label_set])
    expected = [(info.index_to_label_name(i), info.index_to_description(i))
                for i in range(info.num_classes())]
    ours = labels.imagenet_labels(label_set)
    assert len(ours) == labels.LABEL_SETS[label_set] == info.num_classes()
    assert ours == expected
    assert labels.label_set_for_num_classes(len(ours)) == label_set


def test_known_entries_and_aliases():
    assert labels.imagenet_labels()[0] == ("n01440764", "tench, Tinca tinca")
    assert labels.imagenet_labels("imagenet-21k")[0] == ("n00004475", "organism, being")
    assert labels.imagenet_labels("imagenet-21k-goog") == labels.imagenet_labels("imagenet-21k")
    assert labels.label_set_for_num_classes(10) is None
    # Callers get their own list: changing it does not change the next answer.
    names = labels.imagenet_labels()
    names.clear()
    assert len(labels.imagenet_labels()) == 1000


def test_unknown_label_set_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'imagenet-22k'.*imagenet-1k.*imagenet-21k"):
        labels.imagenet_labels("imagenet-22k")


def backend_tensor(array):
    """The array as the running backend's own tensor (torch: one that needs grad)."""
    tensor = keras.ops.convert_to_tensor(array)
    if keras.backend.backend() == "torch":
        tensor.requires_grad_(True)
    return tensor


def numpy_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_softmax_probabilities_and_top_k_order(rng):
    logits = rng.normal(size=(3, 1000)).astype(np.float32) * 4
    decoded = labels.decode_predictions(backend_tensor(logits), "imagenet-1k", top=5)
    names = labels.imagenet_labels()
    probabilities = numpy_softmax(logits.astype(np.float64))
    assert len(decoded) == 3
    for row, p in zip(decoded, probabilities):
        best = np.argsort(-p)[:5]
        assert [(s, n) for s, n, _ in row] == [names[i] for i in best]
        np.testing.assert_allclose([q for *_, q in row], p[best], rtol=1e-6)
        assert all(isinstance(q, float) for *_, q in row)


def test_sigmoid_for_independent_probabilities_and_ties_by_index():
    logits = np.full((1, 21843), -3.0)
    logits[0, [7, 5, 900]] = [2.0, 2.0, 1.0]  # a tie: lower class index first
    decoded = labels.decode_predictions(logits, "imagenet-21k", top=4, activation="sigmoid")
    names = labels.imagenet_labels("imagenet-21k")
    assert [(s, n) for s, n, _ in decoded[0]] == [names[5], names[7], names[900], names[0]]
    expected = 1 / (1 + np.exp(-np.array([2.0, 2.0, 1.0, -3.0])))
    np.testing.assert_allclose([q for *_, q in decoded[0]], expected, rtol=1e-12)


def test_one_image_and_extreme_logits():
    logits = np.zeros(1000)
    logits[3] = 1e4  # would overflow a naive exp
    (row,) = labels.decode_predictions(logits, "imagenet-1k", top=1)
    assert row == [(*labels.imagenet_labels()[3], 1.0)]
    (row,) = labels.decode_predictions(-logits, "imagenet-1k", top=1000, activation="sigmoid")
    assert len(row) == 1000 and row[-1][2] == 0.0 and row[0][2] == 0.5


@pytest.mark.parametrize("other", ["jax", "tensorflow", "torch"])
def test_any_backends_tensor(other, rng):
    # A tensor of any installed framework decodes, whatever Keras' backend is,
    # bfloat16 included (eighths are exact in it).
    logits = rng.integers(-64, 64, size=(2, 1000)) / 8
    if other == "jax":
        import jax.numpy as jnp
        tensor = jnp.asarray(logits, dtype=jnp.bfloat16)
    elif other == "tensorflow":
        import tensorflow as tf
        tensor = tf.constant(logits, dtype=tf.bfloat16)
    else:
        import torch
        tensor = torch.tensor(logits, dtype=torch.bfloat16, requires_grad=True)
    expected = labels.decode_predictions(logits, "imagenet-1k")
    assert labels.decode_predictions(tensor, "imagenet-1k") == expected


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"1000 classes.*'imagenet-21k' has 21843"):
        labels.decode_predictions(np.zeros((2, 1000)), "imagenet-21k")
    with pytest.raises(ValueError, match=r"top=0.*>= 1"):
        labels.decode_predictions(np.zeros((2, 1000)), "imagenet-1k", top=0)
    with pytest.raises(ValueError, match=r"'vit_h14.orig_in21k' has no class labels.*features"):
        labels.decode_predictions(np.zeros((2, 1280)), "vit_h14.orig_in21k")
    with pytest.raises(ValueError, match=r"'vit_x'.*neither a label set.*Unknown preset"):
        labels.decode_predictions(np.zeros((2, 1000)), "vit_x")
    with pytest.raises(ValueError, match=r"activation='relu'.*softmax"):
        labels.decode_predictions(np.zeros((2, 1000)), "imagenet-1k", activation="relu")
    with pytest.raises(ValueError, match=r"shape \(2, 2, 1000\).*\(batch, 1000\)"):
        labels.decode_predictions(np.zeros((2, 2, 1000)), "imagenet-1k")
    with pytest.raises(ValueError, match="NaN"):
        labels.decode_predictions(np.full((1, 1000), np.nan), "imagenet-1k")


def test_every_builtin_tag_names_a_known_label_set_of_its_head_size():
    for name in sorted(registry.REGISTRY):
        for entry in registry.tags(name):
            where = f"{name}.{entry['tag']}"
            if entry.get("labels") is None:
                continue
            assert labels.LABEL_SETS[entry["labels"]] == entry["num_classes"], where
            assert entry["activation"] in labels.ACTIVATIONS, where


def test_real_handles_give_their_label_set_and_activation():
    logits = np.zeros((1, 21843))
    logits[0, 3] = 2.0
    (row,) = labels.decode_predictions(logits, "vit_b16.augreg_in21k", top=2)  # sigmoid head
    assert row[0] == (*labels.imagenet_labels("imagenet-21k")[3], 1 / (1 + np.exp(-2.0)))
    (row,) = labels.decode_predictions(np.zeros(1000), "vit_b16", top=1)       # softmax head
    assert row[0][2] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"'vit_h14.orig_in21k' has no class labels"):
        labels.decode_predictions(np.zeros((1, 1000)), "vit_h14.orig_in21k")
