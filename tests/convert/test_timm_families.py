"""End to end, per family: a timm repo on disk -> streamed conversion -> timm's logits.

Each family of the issue's table (augreg class-token ViT, OpenCLIP tower,
SigLIP MAP tower and classifier, DINOv2 with registers, LayerScale and
packed SwiGLU) is built by timm at small depth and width under its real
architecture name, its parameters redrawn at random, and written as timm's
`save_for_hf` writes a Hub repo (config.json + model.safetensors). The
library reads the repo as the pretrained loader does: config from
config.json and the safetensors header, weights streamed tensor by tensor by
the numpy reader. timm's own forward pass is the judge, in float32.
"""

import json

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

import keras_vitscale as kvs  # noqa: E402
from keras_vitscale.convert import common, files, timm_hub_config, timm_layout  # noqa: E402

from test_timm import TOL, images_for, run, timm_outputs  # noqa: E402
from timm_models import randomize  # noqa: E402

SMALL = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4)
# family -> (timm architecture, its classes, image size)
FAMILIES = {
    "augreg": ("vit_base_patch16_224", 10, 64),
    "clip_tower": ("vit_giant_patch14_clip_224", 16, 56),
    "siglip_map_tower": ("vit_so400m_patch14_siglip_224", 0, 56),
    "siglip_map_classifier": ("vit_so400m_patch14_siglip_378", 10, 56),
    "dinov2_reg4": ("vit_giant_patch14_reg4_dinov2", 0, 56),
}


def save_repo(directory, family, dtype=torch.float32):
    """A small random timm model of `family`, written as a timm Hub repo."""
    from timm.models._hub import save_for_hf

    name, classes, size = FAMILIES[family]
    model = randomize(timm.create_model(name, num_classes=classes, img_size=size, **SMALL))
    model.to(dtype)  # in place; the judge then runs on the stored (rounded) weights
    save_for_hf(model, directory, model_args=dict(SMALL), safe_serialization=True)
    return model.float().eval()


def load_repo(directory, model_class=kvs.ViT):
    """The pretrained loader's steps: config, then the weights streamed in."""
    hf_config = json.loads((directory / "config.json").read_text())
    source = files.open_checkpoint(directory / "model.safetensors")
    config = timm_hub_config.config_from_timm_repo(hf_config, source.shapes)
    timm_layout.check_state_dict(source.shapes, config)
    model = model_class(config=config)
    variables = {v.path: v for v in model.weights}
    for path, array in common.stream_weights(config, source, timm_layout.timm_recipe(
            config, source), source_name="timm"):
        assert array.dtype == np.float32
        variables[path].assign(array)
    return model


def difference(model, reference):
    images = images_for(model.config)
    ours, theirs = run(model, images), timm_outputs(reference, images)
    assert ours.shape == theirs.shape
    return float(np.max(np.abs(ours - theirs)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_timm_repo_converts_to_timms_logits(family, tmp_path):
    reference = save_repo(tmp_path, family)
    model = load_repo(tmp_path)
    c = model.config
    expected = {"augreg": dict(pooling="tok", posemb_covers_class_token=True),
                "clip_tower": dict(pre_norm=True, patch_bias=False, layer_norm_epsilon=1e-5),
                "siglip_map_tower": dict(pooling="map", class_token=False, num_classes=0),
                "siglip_map_classifier": dict(pooling="map", num_classes=10),
                "dinov2_reg4": dict(num_register_tokens=4, mlp_type="swiglu", layer_scale=1e-5,
                                    posemb_covers_class_token=False, num_classes=0)}[family]
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.num_heads == 4 and c.count_params() == sum(p.numel()
                                                        for p in reference.parameters())
    assert difference(model, reference) <= TOL


def test_a_bfloat16_repo_converts_without_torch_in_the_reader(tmp_path):
    # bfloat16 tensors widen exactly: the same logits as timm on the rounded weights.
    reference = save_repo(tmp_path, "dinov2_reg4", dtype=torch.bfloat16)
    header = files.SafetensorsReader(tmp_path / "model.safetensors")
    assert set(header.dtypes.values()) == {"BF16"}
    assert difference(load_repo(tmp_path), reference) <= TOL


def to_open_clip(state):
    """A timm CLIP tower's state dict in OpenCLIP's names (the inverse of timm's loader)."""
    pieces = (("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"),
              ("blocks.", "transformer.resblocks."), ("norm1", "ln_1"), ("norm2", "ln_2"),
              ("attn.qkv.weight", "attn.in_proj_weight"),
              ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj", "attn.out_proj"),
              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
    # A text tower and a logit scale sit beside the image tower.
    out = {"logit_scale": torch.ones(()), "token_embedding.weight": torch.zeros(8, 4)}
    for key, value in state.items():
        if key == "head.bias":  # OpenCLIP's projection has none
            continue
        if key == "head.weight":
            out["visual.proj"] = value.T.contiguous()  # applied as x @ proj
        elif key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        else:
            key = "ln_post." + key[len("norm."):] if key.startswith("norm.") else key
            for old, new in pieces:
                key = key.replace(old, new)
            out["visual." + key] = value
    return out


def test_an_open_clip_file_converts_as_timm_loads_it(tmp_path):
    # timm's own loader (checkpoint_filter_fn) reading the OpenCLIP file is the judge.
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    name, classes, size = FAMILIES["clip_tower"]
    source = randomize(timm.create_model(name, num_classes=classes, img_size=size, **SMALL))
    open_clip = to_open_clip(source.state_dict())
    path = tmp_path / "open_clip_model.safetensors"
    save_file(open_clip, str(path))
    reference = timm.create_model(name, num_classes=classes, img_size=size, **SMALL)
    reference.load_state_dict(checkpoint_filter_fn(dict(open_clip), reference), strict=True)
    assert float(reference.head.bias.detach().abs().max()) == 0.0

    view = files.open_checkpoint(path)
    assert "head.bias" in view and "logit_scale" not in view
    hf_config = {"architecture": name, "num_classes": classes, "global_pool": "token",
                 "model_args": dict(SMALL), "pretrained_cfg": {"input_size": [3, size, size]}}
    config = timm_hub_config.config_from_timm_repo(hf_config, view.shapes)
    model = kvs.ViT(config=config)
    common.assign_weights(model, timm_layout.convert_state_dict(view, config))
    assert difference(model, reference.eval()) <= TOL
    bias = [v for v in model.weights if v.path == "head/bias"][0]
    assert not np.any(keras.ops.convert_to_numpy(bias))
