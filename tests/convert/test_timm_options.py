"""timm -> kvs.ViT for the options real checkpoints need: pre-encoder norm,
bias-free patch embedding and head, LayerScale, register tokens, packed SwiGLU.

timm (PyTorch, eval mode) is the judge: each small model, with every
parameter redrawn at random, gives the same logits after conversion from the
module and from its bare state dict, and `to_timm` rebuilds its layout.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from keras_vitscale import convert  # noqa: E402
from keras_vitscale.convert import timm_layout, timm_module  # noqa: E402

from test_timm import TOL, images_for, max_diff, run, timm_count, timm_outputs  # noqa: E402
from timm_models import small_timm as small  # noqa: E402


SWIGLU = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=4)
OPTIONS = {
    # timm gives a pre-norm model a bias-free patch embedding (OpenCLIP towers).
    "clip_tower": (dict(pre_norm=True, norm_layer=functools.partial(torch.nn.LayerNorm,
                                                                    eps=1e-5)),
                   dict(pre_norm=True, patch_bias=False, layer_norm_epsilon=1e-5)),
    "layer_scale": (dict(init_values=1e-5), dict(layer_scale=1e-5)),
    "registers_no_embed_class": (dict(reg_tokens=4, no_embed_class=True),
                                 dict(num_register_tokens=4, posemb_covers_class_token=False)),
    "registers_embed_class": (dict(reg_tokens=2),
                              dict(num_register_tokens=2, posemb_covers_class_token=True)),
    "registers_avg_no_class": (dict(reg_tokens=2, class_token=False, global_pool="avg"),
                               dict(num_register_tokens=2, pooling="gap", class_token=False)),
    # SwiGLUPacked's fc1 is (2 * 128, 64): mlp_dim is the gated width.
    "swiglu": (SWIGLU, dict(mlp_type="swiglu", mlp_dim=128)),
    "dinov2_reg4": (dict(SWIGLU, reg_tokens=4, no_embed_class=True, init_values=1e-5),
                    dict(mlp_type="swiglu", num_register_tokens=4, layer_scale=1e-5,
                         posemb_covers_class_token=False)),
    "head_without_bias": (dict(head_bias=False), dict(head_bias=False)),
}


@pytest.fixture(scope="module")
def sources():
    return {name: small(**kwargs) for name, (kwargs, _) in OPTIONS.items()}


@pytest.fixture(scope="module")
def converted(sources):
    return {name: convert.from_timm(source) for name, source in sources.items()}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_options_match_timm(name, sources, converted):
    source, model, expected = sources[name], converted[name], OPTIONS[name][1]
    assert {k: getattr(model.config, k) for k in expected} == expected
    assert model.count_params() == timm_count(source) == model.config.count_params()
    assert max_diff(model, source) <= TOL


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_state_dicts_give_the_module_settings_and_to_timm_rebuilds_them(name, sources,
                                                                        converted):
    # A state dict cannot record the epsilon or the heads; the rest is read
    # from its keys and shapes (LayerScale's init is a marker, 1e-5 here).
    source, config = sources[name], converted[name].config
    state = source.state_dict()
    given = dict(num_heads=4, layer_norm_epsilon=config.layer_norm_epsilon)
    assert timm_layout.config_from_state_dict(state, **given) == config
    rebuilt = timm_module.to_timm(config)
    rebuilt.load_state_dict(state, strict=True)
    images = images_for(config)
    np.testing.assert_allclose(timm_outputs(rebuilt.eval(), images),
                               timm_outputs(source, images), atol=1e-6)


def test_a_state_dict_converts_to_the_same_logits(sources):
    source = sources["dinov2_reg4"]
    model = convert.from_timm(source.state_dict(), num_heads=4)
    assert max_diff(model, source) <= TOL


@pytest.mark.parametrize("swap", ["gate_and_value", "layer_scales"])
def test_a_wrong_mapping_exceeds_the_tolerance(swap, sources, converted):
    # The parity test can fail: the SwiGLU halves or the two LayerScales of
    # each block exchanged move the logits far past TOL.
    state = {k: v.clone() for k, v in sources["dinov2_reg4"].state_dict().items()}
    for i in range(2):
        if swap == "gate_and_value":
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.mlp.fc1.{kind}"
                state[key] = torch.roll(state[key], 128, 0)
        else:
            a, b = f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"
            state[a], state[b] = state[b], state[a]
    model = convert.from_timm(state, num_heads=4)
    images = images_for(model.config)
    theirs = timm_outputs(sources["dinov2_reg4"], images)
    assert np.max(np.abs(run(model, images) - theirs)) > 5 * TOL
