"""Fine-tuning: PI-resize, and kvs-finetune (cli/finetune.py) end to end on digits
(new resolution with posemb resampling, linear probe, --resize-patch)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vitscale as kvs
from keras_vitscale.layers import flexi
from keras_vitscale.training import train



def _tool():
    from keras_vitscale.cli import finetune as finetune_tool

    return finetune_tool


def _weights(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.weights}


@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((3, 5), (8, 7)), ((4, 4), (3, 2))])
def test_bilinear_matrix_matches_tf_image_resize(old, new):
    patches = np.random.default_rng(0).normal(size=(5, *old, 3)).astype("float32")
    expected = tf.image.resize(patches, new, method="bilinear", antialias=False).numpy()
    matrix = flexi.bilinear_resize_2d(old, new)
    flat = patches.transpose(0, 3, 1, 2).reshape(5, 3, -1)          # per channel, row-major
    got = (flat @ matrix.T).reshape(5, 3, *new).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("old, new", [(4, 4), (4, 6), (4, 8), (3, 7), ((2, 4), (5, 6))])
def test_pi_resize_preserves_tokens_when_upsampling(old, new):
    rng = np.random.default_rng(1)
    old, new = flexi._pair(old, "old"), flexi._pair(new, "new")
    kernel = rng.normal(size=(*old, 3, 8)).astype("float32")
    patches = rng.uniform(-1, 1, size=(16, *old, 3)).astype("float32")
    upsampled = tf.image.resize(patches, new, method="bilinear", antialias=False).numpy()
    new_kernel = flexi.pi_resize_patch_kernel(kernel, new)
    assert new_kernel.shape == (*new, 3, 8)
    before = patches.reshape(16, -1) @ kernel.reshape(-1, 8)
    after = upsampled.reshape(16, -1) @ new_kernel.reshape(-1, 8)
    np.testing.assert_allclose(after, before, atol=1e-4)
    # A naive resize of the kernel itself does not preserve them.
    if new != old:
        naive = tf.image.resize(kernel.reshape(*old, -1), new, method="bilinear").numpy()
        naive = upsampled.reshape(16, -1) @ naive.reshape(-1, 8)
        assert np.abs(naive - before).max() > 1e-2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny digits model with a learned position embedding (16x16, patch 4)."""
    workdir = tmp_path_factory.mktemp("pretrain")
    summary = train({"workdir": str(workdir), "variant": "mu", "patch_size": 4,
                     "image_size": 16, "posemb": "learn", "batch_size": 32, "steps": 100,
                     "lr": 5e-3, "log_every": 50, "checkpoint_every": 100, "eval_every": 100,
                     "fewshot": "none"}, progress=False, log=lambda m: None)
    print(f"pretrained held-out accuracy {summary['val_accuracy']:.3f}")
    assert summary["val_accuracy"] > 0.5  # the transfer tests below need features
    return workdir


@pytest.mark.integration
def test_finetune_at_higher_resolution_learns(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    code = _tool().main(["--from-workdir", str(pretrained), "--image-size", "24",
                         "--steps", "60", "--batch-size", "32", "--lr", "0.03",
                         "--warmup-steps", "5", "--workdir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    accuracy = rows[-1]["val_accuracy"]
    print(f"fine-tuned 24x24 held-out accuracy {accuracy:.3f}")
    assert f"held-out accuracy {accuracy:.4f}" in printed
    assert accuracy >= 0.5  # chance is 0.1
    model = kvs.ViT.from_preset(str(out / "model"))
    assert model.config.image_size == (24, 24) and model.config.grid_size == (6, 6)
    assert model.get_layer("position_embedding").embedding.shape[1] == 36


@pytest.mark.integration
def test_linear_probe_changes_only_the_head(pretrained, tmp_path):
    out = tmp_path / "probe"
    handle = str(pretrained / "model")
    assert _tool().main(["--preset", handle, "--image-size", "24", "--linear-probe",
                         "--steps", "10", "--batch-size", "32", "--lr", "1.0",
                         "--workdir", str(out)]) == 0
    loaded = _weights(kvs.ViT.from_preset(handle, image_size=24))
    tuned = _weights(kvs.ViT.from_preset(str(out / "model")))
    assert loaded.keys() == tuned.keys()
    for path, value in loaded.items():
        if path.startswith("head/"):
            assert np.abs(tuned[path]).max() > 0, path  # moved away from the zero init
        else:
            np.testing.assert_array_equal(tuned[path], value, err_msg=path)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    accuracy = json.loads(rows[-1])["val_accuracy"]
    print(f"linear probe held-out accuracy {accuracy:.3f}")
    assert accuracy > 0.3  # chance is 0.1


@pytest.mark.integration
def test_resize_patch_runs_on_a_consistent_grid(pretrained, tmp_path, capsys):
    out = tmp_path / "flexi"
    assert _tool().main(["--from-workdir", str(pretrained), "--image-size", "24",
                         "--resize-patch", "6", "--steps", "4", "--batch-size", "32",
                         "--lr", "0.03", "--workdir", str(out)]) == 0
    model = kvs.ViT.from_preset(str(out / "model"))
    assert model.config.patch_size == (6, 6) and model.config.grid_size == (4, 4)
    assert tuple(model.get_layer("patch_embedding").kernel.shape) == (6, 6, 3, model.config.width)
    assert model.get_layer("position_embedding").embedding.shape[1] == 16
    logits = model(np.zeros((2, 24, 24, 3), "float32"))
    assert tuple(logits.shape) == (2, 10)
    # A patch size that does not divide the image size is refused, naming both.
    assert _tool().main(["--from-workdir", str(pretrained), "--image-size", "24",
                         "--resize-patch", "5", "--workdir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--resize-patch 5 does not divide the image size 24x24" in err


@pytest.mark.integration
def test_resize_patch_keeps_the_tokens_of_upsampled_images(pretrained):
    # 16x16 images upsampled 1.5x to 24x24: each 4x4 patch becomes a 6x6 one,
    # so the PI-resized model sees the same tokens before the posemb.
    model = kvs.ViT.from_preset(str(pretrained / "model"))
    resized = flexi.resize_patch(model, 6, image_size=24)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    big = tf.image.resize(images, (24, 24), method="bilinear", antialias=False).numpy()
    old = model.get_layer("patch_embedding")(images)
    new = resized.get_layer("patch_embedding")(big)
    # Whole-image upsampling mixes neighbouring patches at patch borders, so
    # the tokens agree closely rather than exactly.
    old, new = keras.ops.convert_to_numpy(old), keras.ops.convert_to_numpy(new)
    assert np.corrcoef(old.ravel(), new.ravel())[0, 1] > 0.9
