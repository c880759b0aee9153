"""The attention formulation switch: "fused" (keras.ops.dot_product_attention)
and "explicit" (softmax(q k^T / sqrt(dh) + bias) v as matmuls) give the same
outputs on every backend, "auto" is one of them, and a bad name is refused
from the setter and from $KVS_ATTENTION."""

import importlib

import numpy as np
import pytest
from keras import ops

from keras_vitscale.layers.attention import (
    ATTENTION_ENV,
    MultiHeadSelfAttention,
    attention,
    attention_implementation,
    set_attention_implementation,
)
from keras_vitscale.layers.espa import ESPAAttention

# The module, not the `attention` function that keras_vitscale.layers exports.
attention_module = importlib.import_module("keras_vitscale.layers.attention")
NAMES = ("fused", "explicit", "auto")


@pytest.fixture(autouse=True)
def _restore_setting(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    previous = set_attention_implementation(None)
    yield
    set_attention_implementation(previous)


def _under_each_setting(compute):
    """{name: numpy output of compute()} with each formulation chosen."""
    out = {}
    for name in NAMES:
        set_attention_implementation(name)
        out[name] = ops.convert_to_numpy(compute()).astype("float64")
    return out


def _assert_all_close(outputs):
    for name in NAMES[1:]:
        np.testing.assert_allclose(outputs[name], outputs["fused"], rtol=1e-5, atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("with_bias", [False, True])
def test_formulations_give_the_same_attention(rng, with_bias):
    q, k, v = (ops.convert_to_tensor(rng.normal(size=(2, 10, 3, 8)), "float32")
               for _ in range(3))
    bias = ops.convert_to_tensor(rng.normal(size=(1, 3, 10, 10)), "float32") if with_bias else None
    outputs = _under_each_setting(lambda: attention(q, k, v, bias=bias))
    assert outputs["fused"].shape == (2, 10, 3, 8)
    _assert_all_close(outputs)


def test_formulations_give_the_same_layer_outputs(rng):
    """Through the layers the model uses: qk-norm self-attention, and E-SPA's
    attention (a logits bias and a row scale) with a non-zero query kernel."""
    x = rng.normal(size=(2, 16, 32)).astype("float32")
    mhsa = MultiHeadSelfAttention(width=32, num_heads=4, qk_norm=True)
    espa = ESPAAttention(num_heads=4, layer_index=2, depth=4)
    mhsa.build(x.shape)
    espa.build(x.shape)
    espa.qkv.kernel.assign(rng.normal(size=(32, 96)).astype("float32") / np.sqrt(32))
    _assert_all_close(_under_each_setting(lambda: mhsa(x)))
    _assert_all_close(_under_each_setting(lambda: espa(x)))


def test_setting_order_setter_then_environment_then_auto(monkeypatch):
    assert attention_implementation() == "auto"
    monkeypatch.setenv(ATTENTION_ENV, "explicit")
    assert attention_implementation() == "explicit"
    assert attention_module._use_explicit()
    assert set_attention_implementation("fused") is None
    assert attention_implementation() == "fused"
    assert not attention_module._use_explicit()
    assert set_attention_implementation(None) == "fused"
    assert attention_implementation() == "explicit"


def test_bad_name_is_refused_naming_it_and_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"'flash'.*auto, fused, explicit"):
        set_attention_implementation("flash")
    assert attention_implementation() == "auto"  # unchanged by the refusal
    monkeypatch.setenv(ATTENTION_ENV, "Fused")
    with pytest.raises(ValueError, match=r"\$KVS_ATTENTION is 'Fused'.*auto, fused, explicit"):
        attention_implementation()
    q = ops.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="KVS_ATTENTION"):
        attention(q, q, q)
