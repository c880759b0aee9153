"""E-SPA: the decay rates against check values, the target attention
against scipy (tests/reference_espa.py), and the layer under mixed precision.

Check values (depth 12): gamma_1 ~ 0.571, gamma_6 ~ 0.0525, gamma_12 =
0.005, from gamma_l = -0.5 ln(1 - alpha_L^(2 l / L)) with gamma_L = 0.005.
"""

import numpy as np
import pytest
import scipy.special
from keras import ops

from keras_vitscale.layers.espa import ESPAAttention, espa_gammas, espa_target_attention
from reference_espa import reference_attention


# ---- check values -------------------------------------------------------------
def test_gammas_match_reference_check_values():
    gammas = espa_gammas(12)
    assert gammas[0] == pytest.approx(0.571, abs=5e-4)
    assert gammas[5] == pytest.approx(0.0525, abs=5e-5)
    assert gammas[11] == pytest.approx(0.005, abs=1e-12)
    assert np.all(np.diff(gammas) < 0)


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
