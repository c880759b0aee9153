"""The built-in presets: the registry, its metadata and paper shapes, aliases."""

import logging

import pytest

import keras_vitscale as kvs
from keras_vitscale import presets
from keras_vitscale.presets import loader, registry

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
    loader._warned_no_weights.discard("vit_ti16")
    with caplog.at_level(logging.WARNING, logger="keras_vitscale"):
        model = kvs.ViT.from_preset("vit_ti16", num_classes=3, image_size=32)
        kvs.ViT.from_preset("vit_ti16", num_classes=3, image_size=32)
    assert model.config.num_classes == 3 and model.config.width == 192
    assert sum("no published weights" in r.message for r in caplog.records) == 1


def test_one_registry_object():
    assert kvs.ViT.presets is presets.REGISTRY is registry.REGISTRY
    assert "vit_G14" in presets.REGISTRY and presets.ALIASES["vit_G14"] == "vit_bigG14"


def test_builtin_files_are_the_repos_presets_folder_in_a_checkout():
    # The wheel ships them as keras_vitscale/presets/builtin (tests/test_packaging.py).
    found = presets.builtin_dir()
    assert found.name in ("presets", "builtin")
    assert sorted(p.stem for p in found.glob("*.json")) == sorted(presets.REGISTRY)
