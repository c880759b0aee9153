"""Scaling-law fits against known parameters and scipy's curve_fit."""


import numpy as np
import pytest
from scipy.optimize import curve_fit

from keras_vitscale.scaling import fit_plain_power_law
from keras_vitscale.scaling import fit_power_law

TRUE = dict(a=2.0, b=0.4, c=0.05, d=0.5)


def _law(compute, a, b, c, d):
    return a * (compute + d) ** -b + c


@pytest.mark.parametrize("unit", [1.0, 1e18], ids=["core-days", "flops"])
def test_recovers_noiseless_parameters(unit):
    # Compute from d/5 to 2e5 d: both saturations (low compute via d, high
    # via c) are visible, so all four parameters are identified.
    compute = np.logspace(-1, 5, 15)
    error = _law(compute, **TRUE)
    fit = fit_power_law(compute * unit, error)
    # In units of `unit`, a scales by unit^b and d by unit.
    expected = dict(TRUE, a=TRUE["a"] * unit ** TRUE["b"], d=TRUE["d"] * unit)
    for name, value in expected.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-2), name
    np.testing.assert_allclose(fit.predict(compute * unit), error, rtol=1e-6)
    assert fit.rms_log_residual < 1e-8
    # The plain power law cannot bend, so it fits these points much worse.
    assert fit.plain.rms_log_residual > 0.05
    assert fit.plain.c == 0 and fit.plain.d == 0


def test_noisy_fit_agrees_with_curve_fit_and_truth():
    # 2% multiplicative noise on 30 points. Tolerance: 3 standard errors of
    # the fit's own (linearised) uncertainty, which is the honest bound for
    # noisy data (b's stderr here is ~1% of b, d's ~8%); a fixed seed keeps
    # the test deterministic. Both optimisers must also land on the same
    # optimum with the same standard errors, with curve_fit started from the
    # truth rather than from our answer.
    compute = np.logspace(-1, 5, 30)
    rng = np.random.default_rng(0)
    error = _law(compute, **TRUE) * np.exp(0.02 * rng.normal(size=30))
    fit = fit_power_law(compute, error)
    for name, value in TRUE.items():
        assert abs(getattr(fit, name) - value) < 3 * fit.stderr[name], name
    assert fit.stderr["b"] < 0.02 * TRUE["b"]

    def log_law(c, a, b, c0, d):
        return np.log(_law(c, a, b, c0, d))

    popt, pcov = curve_fit(
        log_law, compute, np.log(error), p0=list(TRUE.values()), bounds=(0, np.inf)
    )
    ours = [fit.a, fit.b, fit.c, fit.d]
    np.testing.assert_allclose(ours, popt, rtol=1e-4)
    np.testing.assert_allclose(
        [fit.stderr[n] for n in "abcd"], np.sqrt(np.diag(pcov)), rtol=1e-3
    )


def test_plain_power_law_and_no_shift():
    fit = fit_plain_power_law([1, 10, 100, 1000], [0.5, 0.25, 0.125, 0.0625])
    assert fit.b == pytest.approx(np.log10(2), rel=1e-9)
    assert fit.a == pytest.approx(0.5, rel=1e-9)
    compute = np.logspace(0, 6, 12)
    fit = fit_power_law(compute, _law(compute, 3.0, 0.3, 0.1, 0.0), fit_shift=False)
    assert (fit.a, fit.b, fit.c, fit.d) == pytest.approx((3.0, 0.3, 0.1, 0.0), rel=1e-3)
    assert "d =" not in str(fit).split("plain")[0]


def test_refusals_name_the_counts_and_values():
    with pytest.raises(ValueError, match=r"fits 4 parameters but got 3 points"):
        fit_power_law([1, 2, 3], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match=r"fits 3 parameters but got 2 points"):
        fit_power_law([1, 2], [0.5, 0.4], fit_shift=False)
    with pytest.raises(ValueError, match=r"compute\[2\] = 0.0; every compute must be positive"):
        fit_power_law([1, 2, 0, 4], [0.5, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"compute\[0\] = -1.0"):
        fit_plain_power_law([-1, 2], [0.5, 0.4])
    with pytest.raises(ValueError, match=r"4 compute values but 3 error values"):
        fit_power_law([1, 2, 3, 4], [0.5, 0.4, 0.3])
