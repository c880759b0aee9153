"""E-SPA's target attention computed independently of the library, in float64
with scipy's matrix square root, from the formulas of He et al. 2023 ("Deep
Transformers without Shortcuts"): Sigma_l[i, j] = exp(-gamma_l |i - j|),
gamma_l = -0.5 ln(1 - alpha_L^(2 l / L)) with alpha_L = sqrt(1 - exp(-2
gamma_L)), and A_l = Sigma_l^(1/2) Sigma_{l-1}^(-1/2).
"""

import math

import numpy as np
import scipy.linalg


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
