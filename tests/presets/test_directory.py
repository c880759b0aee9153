"""Preset directories: writing, reading, sharding, bad or foreign files."""

import json

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale import presets
from conftest import random_images
from test_model import randomize


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


def test_local_resolution_leaves_hub_handles_to_the_pretrained_resolver(tmp_path):
    _, directory = _saved(tmp_path)
    assert presets.resolve_directory(str(directory)) == directory
    with pytest.raises(ValueError, match="keras_vitscale.pretrained.resolve_directory"):
        presets.resolve_directory("hf://org/repo")
    with pytest.raises(ValueError, match="Unknown preset 'no/such/dir'"):
        presets.resolve_directory("no/such/dir")


def test_loader_takes_the_model_class_and_resolver(tmp_path):
    model, directory = _saved(tmp_path)
    seen = []

    def resolve(handle):
        seen.append(handle)
        return presets.resolve_directory(handle)

    loaded = presets.load(kvs.ViT, str(directory), resolve=resolve)
    assert seen == [str(directory)] and type(loaded) is kvs.ViT
    x = random_images(model.config)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


def test_presets_import_neither_the_model_nor_the_hub():
    from test_import_graph import import_graph

    graph = import_graph()
    package = [m for m in graph if m == "keras_vitscale.presets"
               or m.startswith("keras_vitscale.presets.")]
    assert len(package) >= 4
    for module in package:
        assert not graph[module] & {"keras_vitscale.model", "keras_vitscale.hub"}, module
    # The Hub reads and writes directories; it neither builds models nor loads presets.
    assert not graph["keras_vitscale.hub"] & {"keras_vitscale.model", "keras_vitscale.presets",
                                              "keras_vitscale.presets.loader"}
