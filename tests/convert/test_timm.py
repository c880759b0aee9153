"""timm -> kvs.ViT: the same logits, the same parameter count, clear errors.

timm (PyTorch, eval mode) is the outside judge. Its parameters are redrawn
at random so that its zero-initialised heads, biases and class tokens cannot
hide a wrong mapping.
"""

import copy
import functools

import keras
import numpy as np
import pytest

# conftest imports timm before Keras: imported after TensorFlow, timm's
# torchvision -> torch._dynamo -> triton chain segfaults.
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import keras_vitscale as kvs  # noqa: E402
from keras_vitscale import convert  # noqa: E402
from keras_vitscale.convert import timm_layout  # noqa: E402
from keras_vitscale.convert import timm_module, verify  # noqa: E402
from timm_models import (images_for, randomize, small_timm, timm_count,  # noqa: E402, F401
                         timm_outputs)

TOL = 1e-4  # float32, max |logit difference|


def run(model, images):
    if keras.backend.backend() == "jax":
        # One XLA compile of the whole graph costs half the CPU of compiling
        # every op of an eager call.
        return keras.ops.convert_to_numpy(model.predict_on_batch(images))
    return keras.ops.convert_to_numpy(model(images, training=False))


def max_diff(model, timm_model, batch=2, pre_logits=False):
    images = images_for(model.config, batch)
    ours = run(model, images)
    theirs = timm_outputs(timm_model, images, pre_logits)
    assert ours.shape == theirs.shape
    diff = float(np.max(np.abs(ours - theirs)))
    # Some small models have logits ~0.03, where TOL alone is loose: their
    # differences must also be tiny relative to the logits.
    assert diff <= 1e-3 * float(np.max(np.abs(theirs)))
    return diff


# ---- standard timm models (built once per module) ----------------------------
@pytest.fixture(scope="module")
def vit_ti():
    source = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    return source, convert.from_timm(source)


@pytest.fixture(scope="module")
def vit_s():
    source = randomize(timm.create_model("vit_small_patch16_224", pretrained=False))
    return source, convert.from_timm(source)


@pytest.mark.parametrize("fixture, params", [("vit_ti", 5_717_416), ("vit_s", 22_050_664)])
def test_standard_models_match_timm(fixture, params, request):
    source, model = request.getfixturevalue(fixture)
    assert model.config.gelu == "exact" and model.config.posemb_covers_class_token
    assert timm_count(source) == params == model.count_params() == model.config.count_params()
    assert max_diff(model, source, batch=2 if fixture == "vit_ti" else 1) <= TOL


@pytest.mark.parametrize("fixture", ["vit_ti", "vit_s"])
def test_state_dict_settings_equal_module_settings(fixture, request):
    # num_heads comes from the VARIANTS table (Ti: 3, S: 6) for a bare state dict.
    source, model = request.getfixturevalue(fixture)
    assert timm_layout.config_from_state_dict(source.state_dict()) == model.config


# ---- small custom models: one feature each -------------------------------------
CUSTOM = {
    "map": (dict(global_pool="map", class_token=False), dict(pooling="map")),
    "qk_norm": (dict(qk_norm=True), dict(qk_norm=True)),
    "avg_fc_norm_no_embed_class": (
        dict(global_pool="avg", no_embed_class=True),
        dict(pooling="gap", norm_position="after_pool", posemb_covers_class_token=False)),
    "non_square_tanh_eps_no_bias": (
        dict(img_size=(48, 80), patch_size=(8, 16), act_layer="gelu_tanh", qkv_bias=False,
             proj_bias=False, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)),
        dict(image_size=(48, 80), patch_size=(8, 16), gelu="tanh", layer_norm_epsilon=1e-5,
             qkv_bias=False, attn_out_bias=False, mlp_bias=False)),
    "no_posemb_no_pool": (dict(pos_embed="none", global_pool=""),
                          dict(posemb="none", pooling="none")),
}


@pytest.fixture(scope="module")
def custom_timm():
    return {name: small_timm(**kwargs) for name, (kwargs, _) in CUSTOM.items()}


@pytest.fixture(scope="module")
def custom_converted(custom_timm):
    return {name: convert.from_timm(source) for name, source in custom_timm.items()}


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_custom_models_match_timm(name, custom_timm, custom_converted):
    source, model, expected = custom_timm[name], custom_converted[name], CUSTOM[name][1]
    assert {k: getattr(model.config, k) for k in expected} == expected
    assert model.count_params() == timm_count(source)
    assert max_diff(model, source) <= TOL


def test_wrong_settings_exceed_the_tolerance(custom_timm, custom_converted):
    # The parity test can fail: the same weights with timm's default LayerNorm
    # epsilon (1e-6 instead of this model's 1e-5) move the logits past TOL.
    name = "non_square_tanh_eps_no_bias"
    source = copy.deepcopy(custom_timm[name])
    for module in source.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    model = custom_converted[name]
    images = images_for(model.config)
    assert np.max(np.abs(run(model, images) - timm_outputs(source, images))) > 5 * TOL


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_state_dict_settings_match_module_settings(name, custom_timm, custom_converted):
    # What a bare state dict cannot record is passed; the rest is inferred
    # (num_heads from the q_norm width for the qk-norm model).
    given = {"non_square_tanh_eps_no_bias": dict(
                 image_size=(48, 80), gelu="tanh", layer_norm_epsilon=1e-5, num_heads=4),
             "no_posemb_no_pool": dict(image_size=64, pooling="none", num_heads=4),
             "map": dict(num_heads=4), "avg_fc_norm_no_embed_class": dict(num_heads=4)}
    config = timm_layout.config_from_state_dict(custom_timm[name].state_dict(),
                                                 **given.get(name, {}))
    assert config == custom_converted[name].config


def test_state_dict_path_matches_timm(custom_timm):
    # num_heads from the q_norm width; num_classes=0 drops the head.
    source = custom_timm["qk_norm"]
    model = convert.from_timm(source.state_dict(), num_classes=0)
    assert model.config.num_heads == 4
    assert not any(v.path.startswith("head/") for v in model.weights)
    assert max_diff(model, source, pre_logits=True) <= TOL


# ---- errors ---------------------------------------------------------------------
def test_unsupported_options_are_named():
    # Each refusal names the feature, from the module and from its state dict.
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", device="meta")
    with pytest.raises(ValueError, match=r"distillation token"):
        convert.from_timm(distilled)
    with pytest.raises(ValueError, match=r"distillation token"):
        timm_layout.config_from_state_dict(distilled.state_dict(), num_heads=3)
    with pytest.raises(ValueError, match=r"global_pool='map' with a class or register token"):
        convert.from_timm(small_timm(global_pool="map"))
    with pytest.raises(ValueError, match=r"global_pool='map' with a class or register token"):
        convert.from_timm(small_timm(global_pool="map", class_token=False,
                                     reg_tokens=2).state_dict(), num_heads=4)
    with pytest.raises(ValueError, match=r"unpacked SwiGLU"):
        convert.from_timm(small_timm(mlp_layer=timm.layers.SwiGLU))
    with pytest.raises(ValueError, match=r"unpacked SwiGLU"):
        convert.from_timm(small_timm(mlp_layer=timm.layers.SwiGLU).state_dict(), num_heads=4)
    with pytest.raises(ValueError, match=r"a norm in the patch embedding"):
        convert.from_timm(small_timm(embed_norm_layer=torch.nn.LayerNorm).state_dict(),
                          num_heads=4)
    with pytest.raises(ValueError, match=r"QuickGELU"):
        convert.from_timm(small_timm(act_layer="quick_gelu"))
    with pytest.raises(TypeError, match=r"timm.models.VisionTransformer; got .*Linear"):
        convert.from_timm(torch.nn.Linear(2, 2))


def test_unknown_and_mismatched_keys_are_listed(custom_timm):
    state = dict(custom_timm["qk_norm"].state_dict())
    state["blocks.1.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 timm key\(s\) the model has no variable for: "
                                         r"\['blocks.1.attn.extra.weight'\]"):
        convert.from_timm(state)
    state = dict(custom_timm["qk_norm"].state_dict())
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    # The mismatch names our variable, the timm key, its shape and the shape needed.
    with pytest.raises(ValueError, match=r"encoder_block_1/mlp/dense_1/kernel: "
                                         r"blocks.1.mlp.fc1.weight \(100, 64\), needs \(256, 64\)"):
        convert.from_timm(state)


def test_missing_settings_ask_for_them(custom_timm):
    with pytest.raises(ValueError, match=r"Cannot infer num_heads .* width 64, depth 2, "
                                         r"mlp_dim 256.*Pass num_heads="):
        convert.from_timm(custom_timm["map"].state_dict())
    with pytest.raises(ValueError, match=r"pos_embed length 31 is not a square grid.*"
                                         r"pass image_size="):
        convert.from_timm(custom_timm["non_square_tanh_eps_no_bias"].state_dict(), num_heads=4)


# ---- ParallelScalingBlock (ViT-22B style) and OpenCLIP towers -----------------------
PARALLEL = {
    "qk_norm_no_qkv_bias": dict(qk_norm=True, qkv_bias=False),
    "qkv_bias": dict(qkv_bias=True),
    "biases_off_separate_out": dict(qkv_bias=False, proj_bias=False, fuse_out_proj=False),
}


def parallel_timm(fuse_out_proj=True, **kwargs):
    from timm.models.vision_transformer import ParallelScalingBlock

    block_fn = functools.partial(ParallelScalingBlock, fuse_out_proj=fuse_out_proj)
    return small_timm(block_fn=block_fn, **kwargs)


@pytest.fixture(scope="module")
def parallel_models():
    return {name: parallel_timm(**kwargs) for name, kwargs in PARALLEL.items()}


@pytest.mark.parametrize("name", sorted(PARALLEL))
def test_parallel_scaling_block_models_match_timm(name, parallel_models):
    source, kwargs = parallel_models[name], PARALLEL[name]
    model = convert.from_timm(source)
    c = model.config
    # timm's block always has an MLP bias (in in_proj.bias or its own mlp_bias).
    assert (c.block, c.qk_norm, c.qkv_bias, c.attn_out_bias, c.mlp_bias, c.mlp_dim) == (
        "parallel", kwargs.get("qk_norm", False), kwargs["qkv_bias"],
        kwargs.get("proj_bias", True), True, 256)
    if kwargs.get("fuse_out_proj", True) and kwargs.get("proj_bias", True):
        assert model.count_params() == timm_count(source)
    assert max_diff(model, source) <= TOL
    # A bare state dict gives the same settings, and to_timm rebuilds timm's
    # layout from them: the state dict loads strictly.
    state = source.state_dict()
    assert timm_layout.config_from_state_dict(state, num_heads=4) == c
    fused = kwargs.get("fuse_out_proj", True)
    timm_module.to_timm(c, fuse_out_proj=fused).load_state_dict(state, strict=True)
    if not fused:  # verify() picks that layout itself (one forward pass is enough)
        assert verify.verify_timm(model, state) <= TOL


def test_parallel_in_proj_order_matters(parallel_models):
    # The parity test can fail: rows put in our [q | k | v | mlp] order, then
    # read as timm's [mlp | q | k | v], move the logits far past TOL.
    source = parallel_models["qkv_bias"]
    state = dict(source.state_dict())
    for i in range(2):
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.in_proj.{kind}"] = torch.roll(state[f"blocks.{i}.in_proj.{kind}"],
                                                             -256, 0)
    model = convert.from_timm(state, num_heads=4)
    images = images_for(model.config)
    assert np.max(np.abs(run(model, images) - timm_outputs(source, images))) > 5 * TOL


def test_parallel_unsupported_options_are_named(parallel_models):
    with pytest.raises(ValueError, match=r"LayerScale in a ParallelScalingBlock \(blocks.0.ls"):
        convert.from_timm(parallel_timm(init_values=1e-5))
    with pytest.raises(ValueError, match=r"LayerScale in a ParallelScalingBlock"):
        convert.from_timm(parallel_timm(init_values=1e-5).state_dict(), num_heads=4)
    # A leftover tensor is refused: a qkv bias the overrides say is absent.
    with pytest.raises(ValueError, match=r"no variable for: \['blocks.0.in_proj.bias'"):
        convert.from_timm(parallel_models["qkv_bias"].state_dict(), num_heads=4, qkv_bias=False)
