"""Built-in presets, preset directories, resolution changes and bad files."""

import json
import logging

import keras
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import keras_vitscale as kvs
from keras_vitscale import presets
from keras_vitscale.layers.embedding import resample_grid
from conftest import random_images
from test_model import randomize

REQUIRED = ["vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_h14", "vit_g14",
            "vit_bigG14", "vit_e14", "vit_22b14"]


def test_registry_lists_required_presets_with_metadata():
    for name in REQUIRED:
        assert name in kvs.ViT.presets
        meta = kvs.ViT.presets[name]["metadata"]
        cfg = presets.builtin_config(name)
        assert meta["params"] == cfg.count_params()
        assert meta["gflops"] == round(cfg.flops_per_image() / 1e9, 1)
        assert meta["image_size"] == cfg.image_size[0]
        assert meta["patch_size"] == cfg.patch_size[0]
        assert meta["pooling"] == cfg.pooling
        assert meta["paper"] and meta["licence"]


def test_every_json_preset_is_consistent():
    for name, entry in kvs.ViT.presets.items():
        assert entry["name"] == name
        cfg = presets.builtin_config(name)
        assert entry["metadata"]["params"] == cfg.count_params(), name


def test_paper_shapes():
    g = presets.builtin_config("vit_g14")
    assert (g.width, g.depth, g.mlp_dim, g.pooling) == (1408, 40, 6144, "map")
    assert presets.builtin_config("vit_G14") == presets.builtin_config("vit_bigG14")
    assert presets.builtin_config("vit_bigG14").width == 1664
    big = presets.builtin_config("vit_22b14")
    assert big.block == "parallel" and big.qk_norm and not big.qkv_bias and not big.norm_bias
    assert big.count_params() / 1e9 == pytest.approx(22.2, abs=0.05)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError) as err:
        kvs.ViT.from_preset("vit_q16")
    for name in REQUIRED:
        assert name in str(err.value)


def test_builtin_without_weights_warns_once(caplog):
    presets._warned_no_weights.discard("vit_ti16")
    with caplog.at_level(logging.WARNING, logger="keras_vitscale"):
        model = kvs.ViT.from_preset("vit_ti16", num_classes=3, image_size=32)
        kvs.ViT.from_preset("vit_ti16", num_classes=3, image_size=32)
    assert model.config.num_classes == 3 and model.config.width == 192
    assert sum("no published weights" in r.message for r in caplog.records) == 1


def _saved(tmp_path, **fields):
    model = randomize(kvs.ViT(**{"variant": "mu/8", "image_size": 32, "num_classes": 4,
                                 **fields}))
    directory = tmp_path / "preset"
    model.save_to_preset(directory)
    return model, directory


def test_save_and_load_preset_directory(tmp_path):
    model, directory = _saved(tmp_path, pooling="map")
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "metadata.json", "model.weights.h5"]
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["parameter_count"] == model.count_params()
    loaded = kvs.ViT.from_preset(str(directory))
    x = random_images(model.config)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


def test_sharded_weights_round_trip(tmp_path):
    model = randomize(kvs.ViT(variant="mu/8", image_size=32, num_classes=4))
    directory = tmp_path / "sharded"
    model.save_to_preset(directory, max_shard_size_gb=40e-6)  # 40 kB shards
    assert (directory / "model.weights.json").exists()
    assert len(list(directory.glob("model_*.weights.h5"))) > 1
    loaded = kvs.ViT.from_preset(directory)
    x = random_images(model.config)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


@pytest.mark.parametrize("method", ["linear", "bicubic"])
def test_new_resolution_resamples_posemb(tmp_path, caplog, method):
    model, directory = _saved(tmp_path)
    with caplog.at_level(logging.WARNING, logger="keras_vitscale"):
        bigger = kvs.ViT.from_preset(directory, image_size=48, resample=method)
    assert any("Resampled the position embedding" in r.message for r in caplog.records)
    old = keras.ops.convert_to_numpy(model.get_layer("position_embedding").embedding)
    new = keras.ops.convert_to_numpy(bigger.get_layer("position_embedding").embedding)
    assert new.shape == (1, 36, 32)
    grid = old[0].reshape(4, 4, 32)
    if method == "linear":  # big_vision: scipy zoom, order 1
        want = scipy.ndimage.zoom(grid, (1.5, 1.5, 1), order=1)
    else:  # timm: torch bicubic with antialiasing
        t = torch.tensor(grid).permute(2, 0, 1)[None]
        want = F.interpolate(t, size=(6, 6), mode="bicubic", antialias=True,
                             align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(new[0], want.reshape(36, 32), atol=1e-5)
    # Every other weight is carried over unchanged.
    same = keras.ops.convert_to_numpy(bigger.get_layer("head").kernel)
    np.testing.assert_array_equal(same, keras.ops.convert_to_numpy(model.get_layer("head").kernel))
    assert bigger(random_images(bigger.config)).shape == (2, 4)


def test_load_weights_file_at_other_resolution(tmp_path):
    model = randomize(kvs.ViT(variant="mu/8", image_size=32, num_classes=4,
                              posemb_covers_class_token=True))
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    bigger = kvs.ViT(variant="mu/8", image_size=64, num_classes=4,
                     posemb_covers_class_token=True)
    bigger.load_weights(path)
    new = keras.ops.convert_to_numpy(bigger.get_layer("position_embedding").embedding)
    old = keras.ops.convert_to_numpy(model.get_layer("position_embedding").embedding)
    np.testing.assert_array_equal(new[:, :1], old[:, :1])  # class token's row kept
    np.testing.assert_allclose(new, resample_grid(old, (4, 4), (8, 8)), atol=1e-6)


def test_new_head_size_gets_fresh_head(tmp_path):
    model, directory = _saved(tmp_path)
    other = kvs.ViT.from_preset(directory, num_classes=7)
    assert not keras.ops.convert_to_numpy(other.get_layer("head").kernel).any()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(other.get_layer("encoder_norm").gamma),
        keras.ops.convert_to_numpy(model.get_layer("encoder_norm").gamma))


def test_missing_files_are_named(tmp_path):
    _, directory = _saved(tmp_path)
    (directory / "metadata.json").unlink()
    (directory / "model.weights.h5").unlink()
    with pytest.raises(FileNotFoundError) as err:
        kvs.ViT.from_preset(directory)
    assert "metadata.json" in str(err.value) and "model.weights.h5" in str(err.value)


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    _, directory = _saved(tmp_path)
    weights = directory / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        kvs.ViT.from_preset(directory)


def test_config_naming_another_class_is_refused(tmp_path):
    _, directory = _saved(tmp_path)
    data = json.loads((directory / "config.json").read_text())
    data.update(module="os", class_name="system")
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="only keras_vitscale.ViT presets are loaded"):
        kvs.ViT.from_preset(directory)


def test_malformed_config_is_refused(tmp_path):
    _, directory = _saved(tmp_path)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        kvs.ViT.from_preset(directory)
    (directory / "config.json").write_text(json.dumps(
        {"module": "keras_vitscale", "class_name": "ViT", "config": {"widht": 3}}))
    with pytest.raises(ValueError, match="Unknown ViTConfig field"):
        kvs.ViT.from_preset(directory)


def test_saving_again_replaces_old_weight_files(tmp_path):
    model, directory = _saved(tmp_path)
    model.save_to_preset(directory, max_shard_size_gb=40e-6)
    assert not (directory / "model.weights.h5").exists()
    assert (directory / "model.weights.json").exists()
