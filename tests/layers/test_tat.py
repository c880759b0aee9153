"""TAT: the TReLU slope against check values and the depth it needs, and the
TReLU layer's C-map by Gauss-Hermite quadrature against the closed form of
Zhang et al. 2022 (C(c) = c + (1 - a)^2 / (pi (1 + a^2)) (sqrt(1 - c^2) - c
arccos(c)), composed 2 * depth times from 0 to eta = 0.9).

Check values: slope 0.2385, 0.4212 and 0.6125 at depths 12, 24 and 64;
eta 0.9 needs depth >= 7.
"""

import math

import numpy as np
import pytest
from keras import ops

from keras_vitscale.config import ViTConfig
from keras_vitscale.layers.blocks import VanillaBlock
from keras_vitscale.layers.tat import TReLU, tat_slope


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
