"""Scaling-law fits: error as a saturating power law of compute.

Scaling ViT (Zhai et al. 2021) fits E = a (C + d)^-b + c: `c` is the error
no amount of compute removes, `d` shifts the curve so that it saturates at
low compute too (the "double-saturating" power law). A plain power law
E = a C^-b is fitted alongside for contrast: on a log-log plot it is a
straight line, and the bend of the data away from it is what `c` and `d`
capture.

`plot_fit` draws a fit (curve, plain law, floor c) on matplotlib axes; the
callers (tools/fit_scaling_law.py, the scaling study) draw their own points.

Fitting choices, and why:
- residuals in log space, log(model) - log(E): the points span orders of
  magnitude of compute and error and should count equally, as they do by eye
  on a log-log plot;
- compute is divided by its geometric mean before fitting, so that a, d and
  the Jacobian are O(1) whatever the unit (FLOPs, core-days); the reported
  parameters and standard errors are converted back to the caller's unit;
- `scipy.optimize.least_squares` with bounds a, b, c, d >= 0, started from
  several (c, d) guesses, each completed by a straight-line fit of
  log(E - c) on log(C + d) for a and b; the lowest cost wins;
- standard errors from the covariance s^2 (J^T J)^-1 at the optimum with
  s^2 = residual sum of squares / (points - parameters), as curve_fit does.
  They are linearised: trust them for well-determined parameters, read them
  as "poorly determined" when they are as large as the value.
"""

import dataclasses

import numpy as np
from scipy import optimize

NAMES = ("a", "b", "c", "d")
_FITTED = {"a*(C+d)^-b+c": "abcd", "a*C^-b+c": "abc", "a*C^-b": "ab"}


@dataclasses.dataclass
class PowerLawFit:
    """A fitted E = a (C + d)^-b + c (or a plain E = a C^-b: c = d = 0).

    Attributes:
        a, b, c, d: parameters in the caller's compute and error units.
        stderr: {name: standard error}; 0 for a parameter held fixed.
        covariance: 4x4 covariance of (a, b, c, d).
        rms_log_residual: root mean square of log(predicted) - log(error).
        num_points: number of points fitted.
        form: "a*(C+d)^-b+c", "a*C^-b+c" or "a*C^-b".
        plain: the plain power law fitted to the same points, for contrast
            (None on a plain fit itself).

    Example:
    >>> fit = kvs.scaling.fit_power_law(compute, error)
    >>> fit.predict(1e22), fit.c           # extrapolation, irreducible error
    >>> print(fit)                         # parameters with uncertainties
    """

    a: float
    b: float
    c: float
    d: float
    stderr: dict
    covariance: np.ndarray
    rms_log_residual: float
    num_points: int
    form: str
    plain: "PowerLawFit | None" = None

    def predict(self, compute):
        """Predicted error at `compute` (scalar or array)."""
        compute = np.asarray(compute, np.float64)
        return self.a * (compute + self.d) ** -self.b + self.c

    def summary(self):
        """Parameters with their standard errors, one per line."""
        lines = [f"E = {self.form}  ({self.num_points} points, rms log residual "
                 f"{self.rms_log_residual:.3g})"]
        for name in _FITTED[self.form]:
                lines.append(f"  {name} = {getattr(self, name):.6g} +- {self.stderr[name]:.3g}")
        return "\n".join(lines)

    def __str__(self):
        text = self.summary()
        if self.plain is not None:
            text += "\nplain power law for contrast:\n" + self.plain.summary()
        return text


def fit_power_law(compute, error, fit_shift=True):
    """Fits E = a (C + d)^-b + c to (compute, error) points.

    Args:
        compute: positive compute per run (any unit: FLOPs, core-days).
        error: positive error per run (e.g. 1 - accuracy).
        fit_shift: fit the low-compute shift d; False holds d = 0 and fits
            E = a C^-b + c (3 parameters), for data that never saturates at
            the low end.

    Returns:
        A `PowerLawFit` with parameters, standard errors, `predict()` and
        `.plain`, the plain power law E = a C^-b on the same points.

    Example:
    >>> fit = fit_power_law([1e18, 1e19, 1e20, 1e21, 1e22],
    ...                     [0.60, 0.41, 0.30, 0.25, 0.23])
    >>> print(fit)
    """
    x, y = _check(compute, error, 4 if fit_shift else 3, "fit_power_law")
    scale = float(np.exp(np.mean(np.log(x))))
    u, logy = x / scale, np.log(y)
    free = [0, 1, 2, 3] if fit_shift else [0, 1, 2]

    def residuals(p):
        full = _full(p, free)
        return np.log(full[0] * (u + full[3]) ** -full[1] + full[2]) - logy

    best = None
    # c below the smallest error (the model must stay positive); d from none
    # to around the middle of the compute range.
    for c0 in (0.0, 0.5 * y.min(), 0.9 * y.min()):
        for d0 in (0.0, 0.1 * u.min(), u.min(), 1.0) if fit_shift else (0.0,):
            slope, intercept = np.polyfit(np.log(u + d0), np.log(y - c0), 1)
            p0 = np.array([np.exp(intercept), max(-slope, 1e-3), c0, d0])[free]
            try:
                r = optimize.least_squares(
                    residuals, p0, bounds=(0.0, np.inf), method="trf",
                    x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=5000,
                )
            except ValueError:  # a start where the model is not finite
                continue
            if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
                best = r
    if best is None:
        raise RuntimeError(
            "every start of the power-law fit failed; check that error "
            "decreases with compute, or try fit_shift=False."
        )
    p = _full(best.x, free)
    cov = _covariance(best.jac, best.fun, len(free))
    cov_full = np.zeros((4, 4))
    cov_full[np.ix_(free, free)] = cov
    params, cov_full = _unscale(p, cov_full, scale)
    fit = _make(params, cov_full, best.fun, "a*(C+d)^-b+c" if fit_shift else "a*C^-b+c")
    fit.plain = fit_plain_power_law(x, y)
    return fit


def fit_plain_power_law(compute, error):
    """Fits E = a C^-b: ordinary least squares of log E on log C.

    Args:
        compute: positive compute per run.
        error: positive error per run.

    Returns:
        A `PowerLawFit` with c = d = 0 (held fixed, standard error 0).

    Example:
    >>> fit_plain_power_law([1, 10, 100], [0.5, 0.25, 0.125]).b   # log10(2)
    """
    x, y = _check(compute, error, 2, "fit_plain_power_law")
    scale = float(np.exp(np.mean(np.log(x))))
    design = np.column_stack([np.ones(len(x)), -np.log(x / scale)])
    coef, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    resid = design @ coef - np.log(y)
    # Parameters (a, b) with a = exp(intercept): the Jacobian of the log
    # model with respect to a is 1/a, so J = design * [1/a, 1].
    a = float(np.exp(coef[0]))
    cov = _covariance(design / np.array([a, 1.0]), resid, 2)
    cov_full = np.zeros((4, 4))
    cov_full[:2, :2] = cov
    params, cov_full = _unscale(np.array([a, coef[1], 0.0, 0.0]), cov_full, scale)
    return _make(params, cov_full, resid, "a*C^-b")


def plot_fit(ax, fit, compute, extrapolate=10.0, color="C0", plain_color="C1"):
    """Draws a fit on matplotlib axes set to log-log: its curve, the plain
    power law fitted alongside (dashed, for contrast) and the error floor c.

    Points are left to the caller (one colour, or one per model size).

    Args:
        ax: a matplotlib `Axes`.
        fit: a `PowerLawFit` (a plain fit draws just its line).
        compute: the fitted compute values; the curves span half the
            smallest to `extrapolate` times the largest.
        extrapolate: how far beyond the largest compute to draw.
        color, plain_color: colours of the fitted curve and the plain law.

    Example:
    >>> fig, ax = plt.subplots()
    >>> ax.scatter(compute, error)
    >>> plot_fit(ax, fit_power_law(compute, error), compute)
    >>> ax.legend(); fig.savefig("fit.png")
    """
    grid = np.geomspace(min(compute) / 2, max(compute) * extrapolate, 200)
    ax.plot(grid, fit.predict(grid), color=color, label=f"E = {fit.form}, b = {fit.b:.3g}")
    if fit.plain is not None:
        ax.plot(grid, fit.plain.predict(grid), "--", color=plain_color,
                label=f"E = a*C^-b, b = {fit.plain.b:.3g}")
    # A floor far below the curve (a fit that found none: c ~ 1e-30) would
    # stretch the log axis over decades of nothing; draw only a visible one.
    if fit.c > 1e-2 * float(np.min(fit.predict(grid))):
        ax.axhline(fit.c, color=color, linestyle=":", label=f"c = {fit.c:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")


def _full(p, free):
    full = np.zeros(4)
    full[free] = p
    return full


def _covariance(jac, resid, num_params):
    dof = len(resid) - num_params
    if dof <= 0:
        # As many points as parameters: an exact fit, no estimate of noise.
        return np.full((num_params, num_params), np.inf)
    s2 = float(resid @ resid) / dof
    return s2 * np.linalg.pinv(jac.T @ jac)


def _unscale(p, cov, scale):
    """Converts parameters fitted on C / scale back to C.

    a (C/s + d')^-b = a s^b (C + d' s)^-b, so a = a' s^b and d = d' s; the
    covariance follows by the Jacobian of that map (delta method).
    """
    a, b, c, d = p
    out = np.array([a * scale**b, b, c, d * scale])
    t = np.diag([scale**b, 1.0, 1.0, scale])
    t[0, 1] = a * scale**b * np.log(scale)
    with np.errstate(invalid="ignore"):  # inf * 0 in the exact-fit case
        cov = t @ cov @ t.T
    return out, cov


def _make(params, cov, resid, form):
    stderr = {
        n: float(np.sqrt(max(cov[i, i], 0.0))) if n in _FITTED[form] else 0.0
        for i, n in enumerate(NAMES)
    }
    return PowerLawFit(
        *map(float, params), stderr=stderr, covariance=cov,
        rms_log_residual=float(np.sqrt(np.mean(resid**2))),
        num_points=len(resid), form=form,
    )


def _check(compute, error, num_params, fn):
    x = np.asarray(compute, np.float64).ravel()
    y = np.asarray(error, np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(
            f"{fn}: {len(x)} compute values but {len(y)} error values; pass "
            "one error per run."
        )
    if len(x) < num_params:
        raise ValueError(
            f"{fn} fits {num_params} parameters but got {len(x)} points; pass "
            f"at least {num_params} runs"
            + ("" if num_params == 2 else " or fit a plain power law (2 parameters)")
            + "."
        )
    for name, v in (("compute", x), ("error", y)):
        bad = ~(np.isfinite(v) & (v > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{fn}: {name}[{i}] = {float(v[i])!r}; every {name} must be positive "
                "and finite (the fit is on a log scale): drop that run."
            )
    return x, y
