"""The architecture options real checkpoints need (pre-encoder LayerNorm,
bias switches, LayerScale, register tokens, packed SwiGLU), alone and in the
combinations of CLIP, DINOv2 and SigLIP towers, against the float64 numpy
forward pass of tests/reference_vit.py, on the active backend."""

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from conftest import random_images
from reference_vit import forward as reference_forward
from test_model import randomize

TINY = dict(variant="mu/8", image_size=32, num_classes=5)
OPTIONS = {
    "pre_norm": dict(pre_norm=True),
    "pre_norm_no_norm_bias": dict(pre_norm=True, norm_bias=False),
    "no_patch_bias": dict(patch_bias=False),
    "no_head_bias": dict(head_bias=False),
    "layer_scale": dict(layer_scale=1e-5),
    "registers_tok": dict(num_register_tokens=3),
    "registers_covered": dict(num_register_tokens=2, posemb_covers_class_token=True),
    "registers_gap_with_class": dict(num_register_tokens=2, pooling="gap"),
    "registers_gap_no_class": dict(num_register_tokens=2, pooling="gap", class_token=False),
    "registers_only_covered": dict(num_register_tokens=1, pooling="gap", class_token=False,
                                   posemb_covers_class_token=True),
    "registers_map": dict(num_register_tokens=2, pooling="map", class_token=False),
    "registers_sincos": dict(num_register_tokens=2, posemb="sincos2d"),
    "registers_none": dict(num_register_tokens=2, pooling="none", class_token=False),
    "swiglu": dict(mlp_type="swiglu"),
    "swiglu_no_bias": dict(mlp_type="swiglu", mlp_bias=False),
    "clip_like": dict(pre_norm=True, patch_bias=False, head_bias=False, layer_norm_epsilon=1e-5,
                      posemb_covers_class_token=True, gelu="exact"),
    "dinov2_like": dict(num_register_tokens=4, layer_scale=1e-5, mlp_type="swiglu",
                        posemb_covers_class_token=False, num_classes=0),
    "dinov2_like_head": dict(num_register_tokens=4, layer_scale=1.0, mlp_type="swiglu",
                             depth=2),
    # So400m's shape scaled down: an MLP width that is no multiple of the width.
    "siglip_like": dict(variant="mu", width=48, depth=2, mlp_dim=179, num_heads=4,
                        patch_size=8, pooling="map", class_token=False, gelu="tanh"),
}


def _check_against_reference(model, atol=1e-5):
    cfg = model.config
    assert {v.path: tuple(v.shape) for v in model.weights} == cfg.parameter_shapes()
    assert model.count_params() == cfg.count_params()
    images = random_images(cfg)
    got = keras.ops.convert_to_numpy(model(images))
    want = reference_forward(model, images)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
    return got


@pytest.mark.parametrize("name", OPTIONS)
def test_option_matches_numpy_reference_and_config(name):
    model = randomize(kvs.ViT(**{**TINY, **OPTIONS[name]}))
    _check_against_reference(model)


def test_output_shapes_with_registers():
    cfg = dict(TINY, num_register_tokens=3)
    assert kvs.ViT(**cfg).config.num_tokens == 16 + 1 + 3
    none = kvs.ViT(**cfg, pooling="none", class_token=False)
    assert tuple(none(random_images(none.config)).shape) == (2, 16 + 3, 5)
    features = kvs.ViT(**{**cfg, "num_classes": 0})
    assert tuple(features(random_images(features.config)).shape) == (2, 32)


def test_token_order_is_class_registers_patches():
    # The prefix tokens' own values reach pooling "none" unchanged when the
    # encoder is an identity; build one: zero every branch with LayerScale 0.
    model = kvs.ViT(**{**TINY, "num_classes": 0, "pooling": "none", "class_token": True,
                       "depth": 1, "num_register_tokens": 2, "layer_scale": 1.0,
                       "posemb": "none"})
    layers = {layer.name: layer for layer in model.layers}
    block = layers["encoder_block_0"]
    for scale in (block.layer_scale_1, block.layer_scale_2):
        scale.gamma.assign(np.zeros(scale.gamma.shape, "float32"))
    norm = layers["encoder_norm"]
    norm.gamma.assign(np.ones(norm.gamma.shape, "float32"))
    rng = np.random.default_rng(1)
    cls = rng.normal(size=(1, 1, 32)).astype("float32")
    registers = rng.normal(size=(1, 2, 32)).astype("float32")
    layers["class_token"].token.assign(cls)
    layers["register_tokens"].tokens.assign(registers)
    out = keras.ops.convert_to_numpy(model(random_images(model.config)))

    def normalised(t):
        t = t - t.mean(-1, keepdims=True)
        return t / np.sqrt((t**2).mean(-1, keepdims=True) + 1e-6)

    np.testing.assert_allclose(out[:, 0], np.repeat(normalised(cls[0]), 2, 0), atol=1e-5)
    np.testing.assert_allclose(out[:, 1:3], np.repeat(normalised(registers), 2, 0), atol=1e-5)


def test_initial_values():
    model = kvs.ViT(**TINY, num_register_tokens=4, layer_scale=1e-5, mlp_type="swiglu",
                    pre_norm=True)
    w = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    for i in range(model.config.depth):
        for k in (1, 2):
            np.testing.assert_array_equal(w[f"encoder_block_{i}/layer_scale_{k}/gamma"],
                                          np.full((32,), 1e-5, "float32"))
    registers = w["register_tokens/tokens"]
    # Registers differ from each other (equal ones would stay equal in training).
    assert 0 < np.std(registers) < 1e-5
    assert len({r.tobytes() for r in registers[0]}) == 4
    np.testing.assert_array_equal(w["pre_norm/gamma"], np.ones(32, "float32"))
    assert w["encoder_block_0/mlp/dense_1/kernel"].shape == (32, 256)


def test_mixed_bfloat16_with_new_options():
    fields = {**TINY, **OPTIONS["dinov2_like_head"], "pre_norm": True, "patch_bias": False}
    model = randomize(kvs.ViT(**fields, dtype="mixed_bfloat16"))
    assert all(v.dtype == "float32" for v in model.weights)
    x = random_images(model.config)
    y = model(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    ref = reference_forward(model, x)
    # bfloat16 has an 8-bit mantissa: agreement to a few percent of the scale.
    assert np.abs(keras.ops.convert_to_numpy(y) - ref).max() < 0.05 * np.abs(ref).max() + 0.05


def test_keras_file_round_trip_with_new_options(tmp_path):
    model = randomize(kvs.ViT(**{**TINY, **OPTIONS["dinov2_like_head"], "pre_norm": True,
                                 "head_bias": False}))
    path = tmp_path / "vit.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.config == model.config
    x = random_images(model.config)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


def test_training_step_moves_the_new_weights():
    keras.utils.set_random_seed(1)
    model = randomize(kvs.ViT(**{**TINY, **OPTIONS["dinov2_like_head"], "pre_norm": True}),
                      seed=3)
    before = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = random_images(model.config, batch=4)
    y = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    for path in ("register_tokens/tokens", "pre_norm/gamma", "encoder_block_1/layer_scale_1/gamma",
                 "encoder_block_1/layer_scale_2/gamma", "encoder_block_1/mlp/dense_1/kernel"):
        assert np.abs(after[path] - before[path]).max() > 0, path
