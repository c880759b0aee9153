"""The vanilla (SimplEsT-ViT) block in a kvs.ViT at initialisation: weight
statistics, each attention equal to E-SPA's target (scipy, in
tests/reference_espa.py), and the whole encoder's token kernel against the
infinite-width E-SPA + TAT recursion (float64 numpy); the vanilla presets.
"""

import json
import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_vitscale as kvs
from keras_vitscale.config import ViTConfig
from keras_vitscale.layers.tat import tat_slope
from keras_vitscale.presets import builtin_dir
from reference_espa import reference_attention

WIDTH, DEPTH, IMAGE, PATCH = 256, 8, 32, 4
TOKENS = (IMAGE // PATCH) ** 2


@pytest.fixture(scope="module")
def vanilla_vit():
    keras.utils.set_random_seed(0)
    return kvs.ViT(variant="mu", width=WIDTH, depth=DEPTH, mlp_dim=4 * WIDTH, num_heads=4,
                   patch_size=PATCH, image_size=IMAGE, block="vanilla", posemb="sincos2d",
                   pooling="gap", num_classes=10)


# ---- vanilla block at initialisation ---------------------------------------------
def test_initialisation_statistics(vanilla_vit):
    model = vanilla_vit
    kernel = ops.convert_to_numpy(model.get_layer("patch_embedding").kernel)
    assert kernel.std() == pytest.approx(1 / math.sqrt(PATCH * PATCH * 3), rel=0.05)
    block = model.get_layer("encoder_block_0")
    qkv = ops.convert_to_numpy(block.attention.qkv.kernel)
    assert np.all(qkv[:, :WIDTH] == 0)  # zero queries
    assert qkv[:, WIDTH:].std() == pytest.approx(1 / math.sqrt(WIDTH), rel=0.02)
    w1 = ops.convert_to_numpy(block.mlp.dense_1.kernel)  # (D, 4D): gain 2
    w2 = ops.convert_to_numpy(block.mlp.dense_2.kernel)  # (4D, D): gain 1
    np.testing.assert_allclose(w1 @ w1.T, 4 * np.eye(WIDTH), atol=1e-4)
    np.testing.assert_allclose(w2.T @ w2, np.eye(WIDTH), atol=1e-4)
    for bias in (block.attention.qkv.bias, block.mlp.dense_1.bias, block.mlp.dense_2.bias):
        assert not np.any(ops.convert_to_numpy(bias))
    shapes = {v.path: tuple(v.shape) for v in model.weights}
    assert shapes == model.config.parameter_shapes()


def test_attention_equals_target_at_init(vanilla_vit, rng):
    """The implied attention matrix out = A V of every layer is A_l."""
    x = rng.normal(size=(2, TOKENS, WIDTH)).astype("float32")
    for i in range(DEPTH):
        attention = vanilla_vit.get_layer(f"encoder_block_{i}").attention
        out = ops.convert_to_numpy(attention(x)).astype("float64")
        kernel = ops.convert_to_numpy(attention.qkv.kernel).astype("float64")
        values = x.astype("float64") @ kernel[:, 2 * WIDTH:]  # (zero bias)
        # Stack the batch along features: out_cat = A values_cat, N x 2D.
        values_cat = np.concatenate(list(values), axis=-1)
        out_cat = np.concatenate(list(out), axis=-1)
        implied = out_cat @ np.linalg.pinv(values_cat)
        want = reference_attention(TOKENS, i + 1, DEPTH)
        assert np.abs(implied - want).max() < 1e-5, i


# ---- signal propagation of the whole encoder -------------------------------------
def _trelu_kernel_map(kernel, slope):
    """Each TReLU maps K_ij -> sqrt(K_ii K_jj) C(K_ij / sqrt(K_ii K_jj))."""
    q = np.sqrt(np.diag(kernel))
    c = np.clip(kernel / np.outer(q, q), -1, 1)
    return np.outer(q, q) * (c + (1 - slope) ** 2 / (np.pi * (1 + slope**2))
                             * (np.sqrt(1 - c * c) - c * np.arccos(c)))


def _block_kernel_map(kernel, slope, attention):
    """Infinite-width map of one vanilla block over 2 inputs x N tokens: the
    attention at init is K -> A K A^T (query zero, values N(0, 1/D)),
    orthogonal linears keep K, then two TReLUs."""
    mix = np.kron(np.eye(2), attention)
    return _trelu_kernel_map(_trelu_kernel_map(mix @ kernel @ mix.T, slope), slope)


def _correlation(kernel):
    q = np.sqrt(np.diag(kernel))
    return kernel / np.outer(q, q)


def _propagation_errors(measured, slope, attention_of_layer):
    """(correlation error, scale error) of the prediction vs measured kernels.

    correlation: mean |corr_pred - corr_measured| over entries and layers,
        predicting every layer from the input kernel (end to end);
    scale: mean over layers of log(mean q_pred / mean q_measured), each
        layer predicted from the measured previous one, so finite-width
        fluctuations of the norm (~10% per layer) do not compound.
    """
    kernel, corr, log_ratio = measured[0], [], []
    for layer in range(1, len(measured)):
        attention = attention_of_layer(layer)
        kernel = _block_kernel_map(kernel, slope, attention)
        corr.append(np.abs(_correlation(kernel) - _correlation(measured[layer])).mean())
        one_step = _block_kernel_map(measured[layer - 1], slope, attention)
        log_ratio.append(math.log(np.diag(one_step).mean() / np.diag(measured[layer]).mean()))
    return float(np.mean(corr)), float(np.mean(log_ratio))


def test_encoder_kernel_follows_espa_tat_prediction(vanilla_vit, rng):
    """Two inputs of N independent Gaussian tokens (cross-correlation 0.5)
    through the blocks of a vanilla kvs.ViT at init: the measured token
    kernel (2N x 2N over both inputs) follows the E-SPA + TAT recursion.

    Tolerances, from width 256 (finite-width noise ~1/sqrt(256) per entry;
    calibrated on 7 initialisations over the torch and tensorflow backends):
    correlation error < 0.035 (measured 0.017-0.022) and |scale error| <
    0.25 (measured -0.01 to 0.12; the norm itself grows ~8x over depth).
    The controls are wrong mechanisms the same data must reject: identity or
    uniform attention and a linear activation (correlation errors 0.10-0.51)
    and a missing row scale d (scale errors -0.39 to -0.52).
    """
    rho = 0.5
    z = rng.normal(size=(2, TOKENS, WIDTH))
    x = np.stack([z[0], rho * z[0] + math.sqrt(1 - rho**2) * z[1]]).astype("float32")
    flat = x.astype("float64").reshape(2 * TOKENS, WIDTH)
    measured = [flat @ flat.T / WIDTH]
    h = ops.convert_to_tensor(x)
    for i in range(DEPTH):
        h = vanilla_vit.get_layer(f"encoder_block_{i}")(h)
        flat = ops.convert_to_numpy(h).astype("float64").reshape(2 * TOKENS, WIDTH)
        measured.append(flat @ flat.T / WIDTH)

    def espa(layer):
        return reference_attention(TOKENS, layer, DEPTH)

    slope = tat_slope(DEPTH)
    corr, scale = _propagation_errors(measured, slope, espa)
    assert corr < 0.035 and abs(scale) < 0.25, (corr, scale)

    def unit_rows(layer):
        a = espa(layer)
        return a / a.sum(axis=1, keepdims=True)

    controls = {
        "identity attention": (slope, lambda l: np.eye(TOKENS)),
        "uniform attention": (slope, lambda l: np.full((TOKENS, TOKENS), 1 / TOKENS)),
        "linear activation": (1.0, espa),
        "no row scale d": (slope, unit_rows),
    }
    for name, (control_slope, attention_of_layer) in controls.items():
        corr, scale = _propagation_errors(measured, control_slope, attention_of_layer)
        assert corr > 0.07 or abs(scale) > 0.3, (name, corr, scale)


# ---- presets ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["simplest_vit_s16", "simplest_vit_s4_32", "simplest_vit_s8_64"])
def test_presets_are_vanilla_and_counts_match_config(name):
    with open(builtin_dir() / f"{name}.json") as f:
        preset = json.load(f)
    fields = dict(preset["config"])
    config = ViTConfig.from_variant(fields.pop("variant"), **fields)
    assert (config.block, config.posemb, config.pooling) == ("vanilla", "sincos2d", "gap")
    assert config.num_patches == {"simplest_vit_s16": 196, "simplest_vit_s4_32": 64,
                                  "simplest_vit_s8_64": 64}[name]
    assert preset["metadata"]["params"] == config.count_params()
    assert preset["metadata"]["gflops"] == round(config.flops_per_image() / 1e9, 1)
    assert preset["weights"] is None
    assert name in kvs.ViT.presets
