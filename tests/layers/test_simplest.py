"""SimplEsT-ViT layers: E-SPA targets, TAT slopes, init-time propagation.

Outside references: REFERENCE.md's check values, scipy's matrix square root
for the E-SPA targets, Gauss-Hermite quadrature of the actual TReLU layer
for its C-map, and the infinite-width kernel recursion (float64 numpy) for
the network at initialisation.
"""

import json
import math

import keras
import numpy as np
import pytest
import scipy.linalg
import scipy.special
from keras import ops

import keras_vitscale as kvs
from keras_vitscale.config import ViTConfig
from keras_vitscale.layers.simplest import (
    ESPAAttention,
    TReLU,
    VanillaBlock,
    espa_gammas,
    espa_target_attention,
    tat_slope,
)
from keras_vitscale.presets import builtin_dir

WIDTH, DEPTH, IMAGE, PATCH = 256, 8, 32, 4
TOKENS = (IMAGE // PATCH) ** 2


def reference_gammas(depth, gamma_last=0.005):
    alpha_last = math.sqrt(1 - math.exp(-2 * gamma_last))
    return [-0.5 * math.log(1 - alpha_last ** (2 * l / depth)) for l in range(1, depth + 1)]


def reference_attention(num_tokens, layer, depth):
    """A_l = sqrtm(Sigma_l) sqrtm(Sigma_{l-1})^-1 with scipy, float64."""
    index = np.arange(num_tokens)
    gammas = reference_gammas(depth)

    def sigma(l):
        if l == 0:
            return np.eye(num_tokens)
        return np.exp(-gammas[l - 1] * np.abs(index[:, None] - index[None, :]))

    current = np.real(scipy.linalg.sqrtm(sigma(layer)))
    return current @ np.linalg.inv(np.real(scipy.linalg.sqrtm(sigma(layer - 1))))


@pytest.fixture(scope="module")
def vanilla_vit():
    keras.utils.set_random_seed(0)
    return kvs.ViT(variant="mu", width=WIDTH, depth=DEPTH, mlp_dim=4 * WIDTH, num_heads=4,
                   patch_size=PATCH, image_size=IMAGE, block="vanilla", posemb="sincos2d",
                   pooling="gap", num_classes=10)


# ---- check values -------------------------------------------------------------
def test_gammas_match_reference_check_values():
    gammas = espa_gammas(12)
    assert gammas[0] == pytest.approx(0.571, abs=5e-4)
    assert gammas[5] == pytest.approx(0.0525, abs=5e-5)
    assert gammas[11] == pytest.approx(0.005, abs=1e-12)
    assert np.all(np.diff(gammas) < 0)


@pytest.mark.parametrize("depth,slope", [(12, 0.2385), (24, 0.4212), (64, 0.6125)])
def test_tat_slopes_match_reference_check_values(depth, slope):
    assert tat_slope(depth) == pytest.approx(slope, abs=6e-5)


@pytest.mark.parametrize("depth", [6, 3, 1])
def test_too_shallow_for_eta_raises_naming_depth_and_minimum(depth):
    with pytest.raises(ValueError, match=rf"depth {depth}\b.*depth >= 7"):
        tat_slope(depth)
    config = ViTConfig.from_variant("mu", depth=depth, patch_size=4, image_size=16,
                                    block="vanilla", posemb="sincos2d", pooling="gap")
    with pytest.raises(ValueError, match="depth >= 7"):
        VanillaBlock(config, layer_index=0)
    assert 0.0 <= tat_slope(7) < 0.1  # 7 is the shallowest that works


# ---- TReLU against quadrature --------------------------------------------------
def test_trelu_cmap_by_quadrature_matches_closed_form_and_reaches_eta():
    """E[phi(u) phi(v)] for unit Gaussians with correlation c, integrated by
    Gauss-Hermite quadrature through the Keras layer, is the closed-form
    C-map; composing it 2 * depth times from 0 gives eta = 0.9."""
    depth = 12
    slope = tat_slope(depth)
    layer = TReLU(slope)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()

    def expectation(c):
        u = nodes[:, None]
        v = c * nodes[:, None] + math.sqrt(max(1 - c * c, 0.0)) * nodes[None, :]
        phi_u = ops.convert_to_numpy(layer(np.broadcast_to(u, v.shape).astype("float32")))
        phi_v = ops.convert_to_numpy(layer(v.astype("float32")))
        return float(np.sum(weights[:, None] * weights[None, :] * phi_u * phi_v))

    assert expectation(1.0) == pytest.approx(1.0, abs=2e-4)  # q is preserved

    def closed_form(c):
        return c + (1 - slope) ** 2 / (math.pi * (1 + slope**2)) * (
            math.sqrt(1 - c * c) - c * math.acos(c))

    for c in (0.0, 0.3, 0.7, 0.95):
        assert expectation(c) == pytest.approx(closed_form(c), abs=2e-3)
    c = 0.0
    for _ in range(2 * depth):
        c = expectation(c)
    assert c == pytest.approx(0.9, abs=5e-3)


# ---- E-SPA targets -------------------------------------------------------------
def test_espa_targets_match_scipy_and_reproduce_sigma():
    """d * softmax(B) row-wise is A_l from scipy's sqrtm, and the product
    A_l ... A_1 has kernel Sigma_l (what E-SPA is designed for)."""
    n, depth = 100, 12
    targets = espa_target_attention(n, depth)
    assert len(targets) == depth
    product = np.eye(n)
    index = np.arange(n)
    for layer in (1, 2, 12):
        d, bias = targets[layer - 1]
        want = reference_attention(n, layer, depth)
        got = d[:, None] * scipy.special.softmax(bias, axis=-1)
        np.testing.assert_allclose(got, want, atol=1e-9)
        # Each row is normalised by its own sum: log-sum-exp over keys is 0.
        np.testing.assert_allclose(scipy.special.logsumexp(bias, axis=-1), 0.0, atol=1e-9)
    for layer in range(1, depth + 1):
        d, bias = targets[layer - 1]
        product = (d[:, None] * scipy.special.softmax(bias, axis=-1)) @ product
    sigma = np.exp(-0.005 * np.abs(index[:, None] - index[None, :]))
    np.testing.assert_allclose(product @ product.T, sigma, atol=1e-6)


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


def test_mixed_precision_attention_close_to_float32(rng):
    x = rng.normal(size=(2, 16, 32)).astype("float32")
    full = ESPAAttention(4, layer_index=3, depth=8, name="attention")
    half = ESPAAttention(4, layer_index=3, depth=8, name="attention", dtype="mixed_bfloat16")
    full.build(x.shape)
    half.build(x.shape)
    half.qkv.kernel.assign(full.qkv.kernel)
    y_full = ops.convert_to_numpy(full(x))
    y_half = ops.convert_to_numpy(ops.cast(half(x), "float32"))
    assert np.abs(y_half - y_full).max() < 0.05 * np.abs(y_full).max()


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
