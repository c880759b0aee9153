"""tf.data pipelines: determinism per seed, value range, resume positions,
per-host sharding, folder and TFDS sources (all data made on the fly)."""

import numpy as np
import pytest

from keras_vitscale import data


def _batches(ds, n):
    return [tuple(np.asarray(t) for t in b) for _, b in zip(range(n), ds)]


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits")


def test_digits_split_is_fixed_and_real(digits):
    assert (digits.num_classes, digits.train.size, digits.held_out.size) == (10, 1437, 360)
    ds = data.eval_dataset(digits, 360, (16, 16), one_hot=False)
    (_, labels), = _batches(ds, 1)
    # stratified: every class held out about equally
    assert np.bincount(labels, minlength=10).min() >= 35


def test_train_stream_deterministic_per_seed_and_in_range(digits):
    kw = dict(batch_size=8, image_size=(16, 16), crop="inception", flip=True)
    a = _batches(data.train_dataset(digits, seed=3, **kw), 3)
    b = _batches(data.train_dataset(digits, seed=3, **kw), 3)
    c = _batches(data.train_dataset(digits, seed=4, **kw), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])
    x, y = a[0]
    assert x.shape == (8, 16, 16, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.5
    np.testing.assert_allclose(y.sum(-1), 1.0)


def test_resume_position_repeats_the_stream(digits):
    # Start at step 181 (past one epoch of 1437 examples at batch 8): the
    # batches must equal those an uninterrupted stream gives at that step.
    kw = dict(batch_size=8, image_size=(16, 16), seed=1, crop="inception", flip=True)
    full = _batches(data.train_dataset(digits, **kw), 183)
    resumed = _batches(data.train_dataset(digits, start_step=181, **kw), 2)
    for (xf, yf), (xr, yr) in zip(full[181:], resumed):
        np.testing.assert_array_equal(xf, xr)
        np.testing.assert_array_equal(yf, yr)


def test_per_host_shards_split_the_global_batch(digits):
    kw = dict(batch_size=8, image_size=(16, 16), seed=0)
    (x, _), = _batches(data.train_dataset(digits, **kw), 1)
    (h0, _), = _batches(data.train_dataset(digits, process_index=0, process_count=2, **kw), 1)
    (h1, _), = _batches(data.train_dataset(digits, process_index=1, process_count=2, **kw), 1)
    np.testing.assert_array_equal(h0, x[0::2])
    np.testing.assert_array_equal(h1, x[1::2])
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        data.train_dataset(digits, batch_size=8, image_size=(16, 16), seed=0, process_count=3)


def test_eval_is_deterministic_and_padding_is_weighted_out(digits):
    a = _batches(data.eval_dataset(digits, 100, (16, 16)), 4)
    b = _batches(data.eval_dataset(digits, 100, (16, 16)), 4)
    np.testing.assert_array_equal(a[-1][0], b[-1][0])
    padded = _batches(data.eval_dataset(digits, 100, (16, 16), pad_to_batch=True), 4)
    assert [len(p[0]) for p in padded] == [100] * 4
    weights = np.concatenate([p[2] for p in padded])
    assert (weights > 0).sum() == 360 and weights[360:].max() == 0
    # real examples weigh 400 / 360, so Keras' per-batch mean over the padded
    # batch of 100 is the mean over the real ones
    np.testing.assert_allclose(weights[:360], 400 / 360, rtol=1e-6)
    assert all(-1 <= p[0].min() and p[0].max() <= 1 for p in padded)


def test_label_smoothing_and_keras_augmentations(digits):
    kw = dict(batch_size=16, image_size=(16, 16), seed=0)
    (_, y), = _batches(data.train_dataset(digits, label_smoothing=0.1, **kw), 1)
    np.testing.assert_allclose(np.sort(np.unique(np.round(y, 6))), [0.01, 0.91], rtol=1e-5)
    # (keras.layers.RandAugment costs ~30 s of CPU to trace inside tf.data,
    # so the test exercises the two label-mixing layers.)
    spec = "cutmix:1.0,mixup:0.2"
    a = _batches(data.train_dataset(digits, augment=spec, **kw), 2)
    b = _batches(data.train_dataset(digits, augment=spec, **kw), 2)
    x, y = a[1]
    assert -1 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    assert ((y > 0.01) & (y < 0.99)).any(), "mixup should mix labels"
    np.testing.assert_array_equal(a[1][0], b[1][0])  # same seed, same draws


@pytest.mark.parametrize("spec, match", [
    ("flipflop:1", "Unknown augmentation 'flipflop'"),
    ("mixup", "needs a number"),
    ("randaugment:50", "out of range"),
])
def test_bad_augment_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        data.parse_augment(spec)


def test_digits_class_split_keeps_each_class_examples_and_remaps_labels(digits):
    from keras_vitscale.data.sources import digit_classes

    assert digit_classes("digits") == tuple(range(10))
    assert digit_classes("digits:6-9") == (6, 7, 8, 9)
    assert digit_classes("digits:4,0,2") == (0, 2, 4)
    assert digit_classes("digits:0-2,7") == (0, 1, 2, 7)

    def arrays(source, split):
        ds = data.eval_dataset(source, 2000, (8, 8), one_hot=False, split=split)
        (x, y), = _batches(ds, 1)
        return x, y

    for spec, classes in (("digits:6-9", (6, 7, 8, 9)), ("digits:0,2,4", (0, 2, 4))):
        split = data.load_source(spec)
        assert split.num_classes == len(classes) and split.name == spec
        for which in ("train", "held_out"):
            x_all, y_all = arrays(digits, getattr(digits, which))
            x, y = arrays(split, getattr(split, which))
            keep = np.isin(y_all, classes)
            # the same examples as the ten-class split, in order, labels 0..k-1
            np.testing.assert_array_equal(x, x_all[keep])
            np.testing.assert_array_equal(np.asarray(classes)[y], y_all[keep])
            assert sorted(set(y.tolist())) == list(range(len(classes)))


@pytest.mark.parametrize("spec, match", [
    ("digits:", r"'digits:': '' is not a digit"),
    ("digits:6-10", r"'6-10' is not within the digits 0-9"),
    ("digits:12", r"'12' is not within the digits 0-9"),
    ("digits:5-3", r"'5-3' is not within the digits 0-9 \(or its range runs backwards"),
    ("digits:a,b", r"'a' is not a digit or a range"),
    ("digits:1,,2", r"'' is not a digit"),
])
def test_bad_digit_class_splits_name_the_value_and_the_forms(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        data.load_source(spec)
    assert "'digits:0-5'" in str(info.value) and "'digits:0,2,4'" in str(info.value)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError,
                       match=r"Unknown dataset 'imagenet'.*digits, digits:CLASSES, synthetic"):
        data.load_source("imagenet")
    with pytest.raises(ValueError, match="does not match dataset 'digits'"):
        data.load_source("digits", num_classes=3)


def test_synthetic_source(digits):
    source = data.load_source("synthetic", num_classes=4, image_size=(16, 16))
    (x, y), = _batches(data.train_dataset(source, 8, (16, 16), seed=0), 1)
    assert x.shape == (8, 16, 16, 3) and y.shape == (8, 4)
    assert -1 <= x.min() and x.max() <= 1


def test_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-specific colour channel
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    source = data.load_source(f"folder:{tmp_path}")
    assert (source.num_classes, source.train.size, source.held_out.size) == (2, 18, 2)
    kw = dict(batch_size=6, image_size=(8, 8), seed=0)
    a = _batches(data.train_dataset(source, **kw), 2)
    b = _batches(data.train_dataset(source, **kw), 2)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    assert -1 <= a[0][0].min() and a[0][0].max() <= 1
    (x, y), = _batches(data.eval_dataset(source, 2, (8, 8), one_hot=False), 1)
    assert x.shape == (2, 8, 8, 3) and sorted(y.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="is not a directory"):
        data.load_source(f"folder:{tmp_path}/missing")


def test_tfds_source_through_a_local_builder(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        """Three classes of 8x8 images, written locally (no download)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24, 0),
                    "test": self._generate_examples(9, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                          "label": i % 3}

    TinyShapes(data_dir=str(tmp_path)).download_and_prepare()
    source = data.load_source("tfds:tiny_shapes", data_dir=str(tmp_path))
    assert (source.num_classes, source.train.size, source.held_out.size) == (3, 24, 9)
    kw = dict(batch_size=4, image_size=(8, 8), seed=5)
    full = _batches(data.train_dataset(source, **kw), 9)
    again = _batches(data.train_dataset(source, **kw), 9)
    resumed = _batches(data.train_dataset(source, start_step=7, **kw), 2)
    for (xa, _), (xb, _) in zip(full, again):
        np.testing.assert_array_equal(xa, xb)
    for (xf, yf), (xr, yr) in zip(full[7:], resumed):
        np.testing.assert_array_equal(xf, xr)
        np.testing.assert_array_equal(yf, yr)
    assert all(-1 <= x.min() and x.max() <= 1 for x, _ in full)
    (x, y), = _batches(data.eval_dataset(source, 9, (8, 8), one_hot=False), 1)
    assert x.shape == (9, 8, 8, 3) and sorted(y.tolist()) == sorted([0, 1, 2] * 3)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_source("tfds:tiny_shapes:dev", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="never downloads"):
        data.load_source("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
