"""The depth-width loss fit of Nemotron-Flash (section 2.1): L(D, W, N) = L0 + a D^-alpha + b W^-beta + c N^-gamma.

D is the depth (blocks), W the width (hidden size), N the training tokens. The fit is nonlinear least squares
(scipy.optimize.least_squares, bounded: a, b, c >= 0, exponents in [0, 4]) on inputs scaled by their geometric
means, from several starting exponents; the best residual wins. ``holdout_error`` fits on some points and reports
the error on the others (the paper's use: extrapolate to larger budgets). ``matched_width`` finds, for a depth,
the width whose parameter count is closest to a budget.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

PARAMETERS = ("L0", "a", "alpha", "b", "beta", "c", "gamma")


class FitError(ValueError):
    """Too few or unusable points for the fit."""


@dataclass
class ScalingFit:
    L0: float
    a: float
    alpha: float
    b: float
    beta: float
    c: float
    gamma: float
    rmse: float = float("nan")
    points: int = 0

    def predict(self, depth, width, tokens):
        d, w, n = (np.asarray(x, dtype=float) for x in (depth, width, tokens))
        return self.L0 + self.a * d ** -self.alpha + self.b * w ** -self.beta + self.c * n ** -self.gamma

    def to_dict(self) -> dict:
        return asdict(self)

    def formula(self) -> str:
        return (f"L = {self.L0:.4f} + {self.a:.4g} D^-{self.alpha:.4f} + {self.b:.4g} W^-{self.beta:.4f} "
                f"+ {self.c:.4g} N^-{self.gamma:.4f}")


def fit_scaling_law(depth: Sequence, width: Sequence, tokens: Sequence, loss: Sequence,
                    exponent_starts: Sequence = (0.1, 0.4, 1.0)) -> ScalingFit:
    """Least-squares fit of L0 + a D^-alpha + b W^-beta + c N^-gamma to the points."""
    from scipy.optimize import least_squares

    d, w, n, y = (np.asarray(x, dtype=float) for x in (depth, width, tokens, loss))
    if not (len(d) == len(w) == len(n) == len(y)):
        raise FitError("depth, width, tokens and loss must have the same length")
    if len(y) < len(PARAMETERS) + 1:
        raise FitError(f"{len(y)} points: the fit has {len(PARAMETERS)} parameters, give at least "
                       f"{len(PARAMETERS) + 1}")
    if not np.all(np.isfinite(y)) or np.any(d <= 0) or np.any(w <= 0) or np.any(n <= 0):
        raise FitError("losses must be finite and depth, width, tokens positive")
    for name, x in (("depth", d), ("width", w), ("tokens", n)):
        if np.unique(x).size < 2:
            raise FitError(f"all points have the same {name}: its term cannot be fitted")
    # Scaled inputs (geometric mean 1) keep the coefficients O(loss).
    refs = [float(np.exp(np.log(x).mean())) for x in (d, w, n)]
    xs = [x / r for x, r in zip((d, w, n), refs)]

    def model(p):
        L0, A, al, B, be, C, ga = p
        return L0 + A * xs[0] ** -al + B * xs[1] ** -be + C * xs[2] ** -ga

    lower = [-np.inf, 0, 0, 0, 0, 0, 0]
    upper = [np.inf, np.inf, 4, np.inf, 4, np.inf, 4]
    best = None
    spread = float(y.max() - y.min()) or 1.0
    for al, be, ga in itertools.product(exponent_starts, repeat=3):
        p0 = [float(y.min()) - spread, spread, al, spread, be, spread, ga]
        try:
            sol = least_squares(lambda p: model(p) - y, p0, bounds=(lower, upper), x_scale="jac",
                                xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000)
        except ValueError:
            continue
        if best is None or sol.cost < best.cost:
            best = sol
    if best is None:
        raise FitError("the least-squares fit failed from every start")
    L0, A, al, B, be, C, ga = best.x
    rmse = float(np.sqrt(np.mean((model(best.x) - y) ** 2)))
    return ScalingFit(L0=float(L0), a=float(A * refs[0] ** al), alpha=float(al), b=float(B * refs[1] ** be),
                      beta=float(be), c=float(C * refs[2] ** ga), gamma=float(ga), rmse=rmse, points=len(y))


def prediction_errors(fit: ScalingFit, depth, width, tokens, loss) -> dict:
    """Error of ``fit`` on these points: mean / max absolute, mean relative, and the per-point residuals."""
    y = np.asarray(loss, dtype=float)
    pred = fit.predict(depth, width, tokens)
    err = pred - y
    return {"points": int(len(y)), "mean_abs_error": float(np.mean(np.abs(err))),
            "max_abs_error": float(np.max(np.abs(err))), "mean_rel_error": float(np.mean(np.abs(err) / np.abs(y))),
            "predicted": pred.tolist(), "actual": y.tolist()}


def split_holdout(rows: list, how: str = "largest-tokens", seed: int = 0) -> tuple[list, list]:
    """(fit rows, held-out rows). ``largest-tokens``: hold out the points of the largest token budget
    (extrapolation in N); ``largest-depth``: the deepest models; ``random:F``: a fraction F at random."""
    if how in ("largest-tokens", "largest-depth"):
        key = "tokens" if how == "largest-tokens" else "depth"
        top = max(r[key] for r in rows)
        return [r for r in rows if r[key] != top], [r for r in rows if r[key] == top]
    if how.startswith("random:"):
        frac = float(how.split(":", 1)[1])
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        cut = max(1, int(round(frac * len(rows))))
        held = set(order[:cut].tolist())
        return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
    raise FitError(f"holdout {how!r}: use largest-tokens, largest-depth or random:FRACTION")


def holdout_error(rows: list, how: str = "largest-tokens", seed: int = 0) -> tuple[ScalingFit, dict]:
    """Fit on the rows that are not held out ({depth, width, tokens, loss} dicts); report the held-out error."""
    fit_rows, held = split_holdout(rows, how, seed)
    if not held:
        raise FitError(f"holdout {how!r} leaves no point out")
    fit = fit_scaling_law(*(np.array([r[k] for r in fit_rows]) for k in ("depth", "width", "tokens", "loss")))
    errors = prediction_errors(fit, *(np.array([r[k] for r in held]) for k in ("depth", "width", "tokens", "loss")))
    return fit, errors


def matched_width(params_of: Callable[[int], int], budget: float, candidates: Sequence[int]) -> tuple[int, int]:
    """(width, parameters) among ``candidates`` whose parameter count is closest to ``budget`` (in log space).

    The parameter count grows with the width, so a bisection finds the two candidates around the budget with a
    handful of ``params_of`` calls.
    """
    widths = sorted(set(int(w) for w in candidates))
    if not widths:
        raise FitError("no candidate widths")
    lo, hi = 0, len(widths) - 1
    while lo < hi:  # first width whose parameter count reaches the budget (or the last one)
        mid = (lo + hi) // 2
        if params_of(widths[mid]) >= budget:
            hi = mid
        else:
            lo = mid + 1
    options = [widths[i] for i in {max(lo - 1, 0), lo}]
    best = min(options, key=lambda w: (abs(math.log(params_of(w) / budget)), w))
    return best, params_of(best)
