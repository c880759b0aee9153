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
    loader._warned_no_weights.discard("vit_g14")
    with caplog.at_level(logging.WARNING, logger="keras_vitscale"):
        model = kvs.ViT.from_preset("vit_g14", num_classes=3, image_size=28, depth=1)
        kvs.ViT.from_preset("vit_g14", num_classes=3, image_size=28, depth=1)
    assert model.config.num_classes == 3 and model.config.width == 1408
    assert sum("no published weights" in r.message for r in caplog.records) == 1


def test_one_registry_object():
    assert kvs.ViT.presets is presets.REGISTRY is registry.REGISTRY
    assert "vit_G14" in presets.REGISTRY and presets.ALIASES["vit_G14"] == "vit_bigG14"


def test_builtin_files_are_the_repos_presets_folder_in_a_checkout():
    # The wheel ships them as keras_vitscale/presets/builtin (tests/test_packaging.py).
    found = presets.builtin_dir()
    assert found.name in ("presets", "builtin")
    assert sorted(p.stem for p in found.glob("*.json")) == sorted(presets.REGISTRY)


# ---- tags: published checkpoints -------------------------------------------------
ISSUE_HANDLES = [
    "vit_ti16.augreg_in21k_ft_in1k", "vit_s16.augreg_in21k_ft_in1k",
    "vit_b16.augreg2_in21k_ft_in1k", "vit_b16.augreg_in21k", "vit_b32.augreg_in21k_ft_in1k",
    "vit_l16.augreg_in21k_ft_in1k", "vit_h14.orig_in21k", "vit_g14_clip.laion2b",
    "vit_bigG14_clip.laion2b", "vit_so400m14_siglip.webli",
    "vit_so400m14_siglip_378.webli_ft_in1k", "vit_b16_siglip.webli",
    "vit_g14_dinov2_reg4.lvd142m"]


def _timm_cfg(entry):
    timm_models = pytest.importorskip("timm.models")
    return timm_models.get_pretrained_cfg(entry["source"].split("/", 1)[1]).to_dict()


@pytest.mark.parametrize("handle", ISSUE_HANDLES)
def test_tag_records_timms_pretrained_config(handle):
    name, tag = handle.split(".")
    entry = presets.weights_entry(name, tag)
    cfg = _timm_cfg(entry)
    assert entry["source"] == cfg["hf_hub_id"]
    assert entry["licence"] == cfg["license"]
    assert entry["num_classes"] == cfg["num_classes"]
    pre = entry["preprocessing"]
    assert tuple(pre["input_size"]) == tuple(cfg["input_size"])
    for key in ("crop_pct", "crop_mode", "interpolation"):
        assert pre[key] == cfg[key], key
    for key in ("mean", "std"):
        assert tuple(pre[key]) == pytest.approx(tuple(cfg[key])), key
    config = presets.builtin_config(name, tag=tag)
    assert config.num_classes == cfg["num_classes"]
    assert config.image_size == tuple(cfg["input_size"][1:])
    assert (entry["labels"] is None) == (cfg["num_classes"] == 0 or "clip" in name)


@pytest.mark.parametrize("handle", ISSUE_HANDLES)
def test_tagged_config_counts_equal_timms_model(handle):
    # timm's full-size model on the meta device: shapes only, nothing allocated.
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    name, tag = handle.split(".")
    entry = presets.weights_entry(name, tag)
    timm_name = entry["source"].split("/", 1)[1].split(".")[0]
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False,
                                      num_classes=entry["num_classes"])
    expected = sum(p.numel() for p in reference.parameters())
    assert presets.builtin_config(name, tag=tag).count_params() == expected


def test_bare_name_is_the_default_tag_and_tags_are_listed():
    assert presets.parse_handle("vit_b16") == presets.PresetHandle("vit_b16", None, None)
    assert presets.parse_handle("vit_G14.x@v2") == presets.PresetHandle("vit_bigG14", "x", "v2")
    assert presets.parse_handle("runs/digits/model") is None
    assert presets.weights_entry("vit_b16")["tag"] == "augreg2_in21k_ft_in1k"
    assert presets.weights_entry("vit_g14") is None
    table = repr(kvs.ViT.presets)
    assert "vit_b16.augreg_in21k " in table and "timm/vit_base_patch16_224.augreg_in21k" in table
    assert "vit_g14 " in table and "none: fresh weights" in table


def test_load_weights_false_builds_the_checkpoints_architecture():
    model = kvs.ViT.from_preset("vit_b16.augreg_in21k", load_weights=False, depth=1,
                                image_size=32)
    assert model.config.gelu == "exact" and model.config.num_classes == 21843
    assert presets.builtin_config("vit_b16").gelu == "tanh"  # the architecture alone
