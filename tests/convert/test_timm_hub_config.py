"""A timm Hub repo's config from its config.json and tensor shapes, judged by timm.

For each architecture of the issue's table, timm builds the full-size model
on the meta device (nothing is allocated) and writes the config.json it
would push (`save_config_for_hf`, which writes no weights); the repo's
config must equal `config_from_module`'s reading of the same model, and
every timm tensor must map to exactly one Keras variable of its shape.
"""

import json
import re

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from keras_vitscale.convert import timm_hub_config, timm_layout, timm_module  # noqa: E402

# (timm name, classes): the table.
TABLE = [
    ("vit_tiny_patch16_224", 1000), ("vit_small_patch16_224", 1000),
    ("vit_base_patch16_224", 1000), ("vit_base_patch16_224", 21843),
    ("vit_base_patch32_224", 1000), ("vit_large_patch16_224", 1000),
    ("vit_huge_patch14_224", 0), ("vit_giant_patch14_clip_224", 1024),
    ("vit_gigantic_patch14_clip_224", 1280), ("vit_so400m_patch14_siglip_224", 0),
    ("vit_so400m_patch14_siglip_378", 1000), ("vit_base_patch16_siglip_224", 0),
    ("vit_giant_patch14_reg4_dinov2", 0),
]


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def hub_config(model, tmp_path, model_args=True):
    """The config.json timm's push_to_hf_hub writes for `model` (no weights)."""
    from timm.models._hub import save_config_for_hf

    path = tmp_path / "config.json"
    save_config_for_hf(model, path)
    hf_config = json.loads(path.read_text())
    if not model_args:  # repos pushed before timm recorded model_args have none
        hf_config.pop("model_args", None)
    return hf_config


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_args", [True, False], ids=["model_args", "no_model_args"])
@pytest.mark.parametrize("name, classes", TABLE)
def test_repo_config_equals_the_module_config(name, classes, model_args, tmp_path):
    model = meta_model(name, num_classes=classes)
    config = timm_hub_config.config_from_timm_repo(hub_config(model, tmp_path, model_args),
                                                   shapes_of(model))
    assert config == timm_module.config_from_module(model)
    assert config.num_classes == classes


@pytest.mark.parametrize("name, classes", TABLE)
def test_full_size_mapping_is_one_to_one(name, classes, tmp_path):
    # Every timm tensor is the source of exactly one Keras variable of the
    # same number of values (its shape in our layout), and none is left over;
    # no weight is materialised.
    model = meta_model(name, num_classes=classes)
    shapes = shapes_of(model)
    config = timm_hub_config.config_from_timm_repo(hub_config(model, tmp_path), shapes)
    ours = config.parameter_shapes()
    owners = {}
    for path, shape in ours.items():
        source = timm_layout.timm_source(path, shape, config, shapes)
        assert len(source.keys) == 1, path  # sequential blocks: one tensor per variable
        key = source.keys[0]
        assert key not in owners, f"{key} feeds {owners.get(key)} and {path}"
        owners[key] = path
        assert shapes[key] == tuple(source.shapes[0]), path
        assert sorted(shapes[key]) == sorted(shape), path  # a transpose at most
    assert set(owners) == set(shapes)
    assert timm_layout.check_state_dict(shapes, config) == ours
    assert config.count_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, feature", [
    ("deit_base_distilled_patch16_224", "distillation token"),
    ("eva02_base_patch14_224", "rotary position embeddings"),
    ("vit_base_patch16_rope_224", "rotary position embeddings"),
    ("beit_base_patch16_224", "relative position bias"),
    ("naflexvit_base_patch16_gap", "NaFlex"),
    ("vit_base_patch16_clip_quickgelu_224", "QuickGELU"),
    ("vit_relpos_base_patch16_224", "relative position embeddings"),
    ("vit_base_r50_s16_224", "hybrid CNN stem"),
    ("vit_so400m_patch14_siglip_384", r"input size \(384, 384\) that is not a multiple"),
])
def test_unsupported_architectures_are_refused_by_name(name, feature, tmp_path):
    # Refused from config.json and the shapes alone, before any weight download.
    model = meta_model(name)
    with pytest.raises(ValueError, match=feature) as info:
        timm_hub_config.config_from_timm_repo(hub_config(model, tmp_path), shapes_of(model))
    assert name in str(info.value)


def test_what_cannot_be_known_is_asked_for(tmp_path):
    model = meta_model("vit_tiny_patch16_224")
    hf_config, shapes = hub_config(model, tmp_path), shapes_of(model)
    with pytest.raises(ValueError, match=r"not a timm repo's config"):
        timm_hub_config.config_from_timm_repo({"architectures": ["ViTModel"]}, shapes)
    with pytest.raises(ValueError, match=r"'resnet50' is not one of the VisionTransformer "
                                         r"families.*from_timm\(timm.create_model"):
        timm_hub_config.config_from_timm_repo({**hf_config, "architecture": "resnet50"},
                                              shapes)
    with pytest.raises(ValueError, match=r"num_classes=10, but the weights have a "
                                         r"1000-class head"):
        timm_hub_config.config_from_timm_repo({**hf_config, "num_classes": 10}, shapes)
    # A narrower model under a known name: neither the family nor VARIANTS
    # knows its heads; model_args can say.
    narrow_model = meta_model("vit_tiny_patch16_224", embed_dim=80, num_heads=5)
    narrow = shapes_of(narrow_model)
    with pytest.raises(ValueError, match=r"head count is not recorded.*'num_heads'"):
        timm_hub_config.config_from_timm_repo(
            {**hf_config, "architecture": "vit_foo_patch16_224"}, narrow)
    config = timm_hub_config.config_from_timm_repo(
        {**hf_config, "architecture": "vit_foo_patch16_224", "model_args": {"num_heads": 5}},
        narrow)
    assert config == timm_module.config_from_module(narrow_model)


def test_model_args_settings_win(tmp_path):
    model = meta_model("vit_small_patch16_224", act_layer="gelu_tanh", num_classes=0)
    hf_config = hub_config(model, tmp_path)
    hf_config["model_args"].update(act_layer="gelu_tanh", num_heads=6)
    config = timm_hub_config.config_from_timm_repo(hf_config, shapes_of(model))
    assert config == timm_module.config_from_module(model) and config.gelu == "tanh"
    hf_config["model_args"]["act_layer"] = "quick_gelu"
    with pytest.raises(ValueError, match=r"act_layer='quick_gelu'"):
        timm_hub_config.config_from_timm_repo(hf_config, shapes_of(model))


@pytest.mark.integration
def test_every_timm_vision_transformer_reads_as_its_module(tmp_path):
    # Over all of timm's VisionTransformer and DeiT architectures: the family
    # facts give the module's own config, or both readings refuse it.
    names = timm.list_models(module="vision_transformer") + timm.list_models(module="deit")
    disagreements = []
    for name in names:
        if re.match(r"test_", name):  # timm's unit-test toys, never published
            continue
        model = meta_model(name)
        try:
            expected = timm_module.config_from_module(model)
        except ValueError:
            expected = None
        try:
            got = timm_hub_config.config_from_timm_repo(hub_config(model, tmp_path, False),
                                                        shapes_of(model))
        except ValueError:
            got = None
        if got != expected:
            disagreements.append(name)
    assert not disagreements, disagreements
