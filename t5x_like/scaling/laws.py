"""Fitting Kaplan et al. (2020) and Hoffmann et al. (2022) scaling laws to measured losses.

- Kaplan: L(N) = (N_c / N)^alpha_N, L(D) = (D_c / D)^alpha_D (eqs. 1.1, 1.2), and jointly
  L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (eq. 1.5).
- Chinchilla (Hoffmann et al., approach 3): L = E + A / N^alpha + B / D^beta, fitted by
  minimising the Huber loss (delta = 1e-3) of log-space residuals with L-BFGS from a grid
  of initial points; confidence intervals by bootstrap over runs; the compute-optimal
  allocation for C = 6 N D follows in closed form (their eq. 4).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import optimize, special


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(x) = (x_c / x)^alpha."""
  scale: float
  alpha: float

  def __call__(self, x):
    return (self.scale / np.asarray(x, float)) ** self.alpha


def fit_power_law(x, loss) -> PowerLaw:
  """Least squares in log-log space: log L = alpha log x_c - alpha log x."""
  slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
  alpha = -slope
  return PowerLaw(scale=float(np.exp(intercept / alpha)), alpha=float(alpha))


@dataclasses.dataclass(frozen=True)
class KaplanJoint:
  n_c: float
  d_c: float
  alpha_n: float
  alpha_d: float

  def __call__(self, n, d):
    n, d = np.asarray(n, float), np.asarray(d, float)
    return ((self.n_c / n) ** (self.alpha_n / self.alpha_d) + self.d_c / d) ** self.alpha_d


# Kaplan et al.'s one-variable laws (their eqs. 1.1 and 1.2: N_c 8.8e13, D_c 5.4e13 tokens) as eq.
# 1.5's start, which needs no slope of the data: across an isoFLOP design, loss can rise with N.
KAPLAN_START = KaplanJoint(n_c=8.8e13, d_c=5.4e13, alpha_n=0.076, alpha_d=0.095)
MIN_ALPHA = 1e-3


def fit_kaplan_joint(n, d, loss) -> KaplanJoint:
  """Nonlinear least squares on log L, from the one-variable fits where their slopes are
  usable and from Kaplan et al.'s values; the better fit is kept."""
  n, d, loss = map(lambda a: np.asarray(a, float), (n, d, loss))

  def residuals(theta):
    log_n_c, log_d_c, alpha_n, alpha_d = theta
    inner = np.exp((alpha_n / alpha_d) * (log_n_c - np.log(n))) + np.exp(log_d_c - np.log(d))
    return alpha_d * np.log(inner) - np.log(loss)

  starts = [KAPLAN_START]
  start_n, start_d = fit_power_law(n, loss), fit_power_law(d, loss)
  if min(start_n.alpha, start_d.alpha) > MIN_ALPHA and np.isfinite([start_n.scale, start_d.scale]).all():
    starts.append(KaplanJoint(start_n.scale, start_d.scale, start_n.alpha, start_d.alpha))
  results = [optimize.least_squares(residuals, [np.log(s.n_c), np.log(s.d_c), s.alpha_n, s.alpha_d],
                                    bounds=([-np.inf, -np.inf, MIN_ALPHA, MIN_ALPHA], np.inf)) for s in starts]
  log_n_c, log_d_c, alpha_n, alpha_d = min(results, key=lambda result: result.cost).x
  return KaplanJoint(float(np.exp(log_n_c)), float(np.exp(log_d_c)), float(alpha_n), float(alpha_d))


@dataclasses.dataclass(frozen=True)
class Chinchilla:
  e: float
  a: float
  b: float
  alpha: float
  beta: float

  def __call__(self, n, d):
    return self.e + self.a / np.asarray(n, float) ** self.alpha + self.b / np.asarray(d, float) ** self.beta

  def optimal_allocation(self, compute):
    """(N*, D*) minimising L subject to 6 N D = C (Hoffmann et al. eq. 4)."""
    g = (self.alpha * self.a / (self.beta * self.b)) ** (1 / (self.alpha + self.beta))
    c6 = np.asarray(compute, float) / 6
    return g * c6 ** (self.beta / (self.alpha + self.beta)), c6 ** (self.alpha / (self.alpha + self.beta)) / g


# Hoffmann et al.'s grid of initial values (their appendix D.2).
CHINCHILLA_GRID = dict(alpha=np.arange(0.0, 2.01, 0.5), beta=np.arange(0.0, 2.01, 0.5),
                       e=np.arange(-1.0, 1.01, 0.5), a=np.arange(0.0, 25.1, 5.0), b=np.arange(0.0, 25.1, 5.0))


# Two starts per parameter: 32 fits instead of 4500, for quick looks and tests.
COARSE_GRID = dict(alpha=[0.2, 0.6], beta=[0.2, 0.6], e=[0.0, 1.0], a=[3.0, 7.0], b=[3.0, 7.0])


def _chinchilla_objective(theta, log_n, log_d, log_loss, delta):
  """Huber loss of log-space residuals and its gradient in (log A, log B, log E, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  predicted = special.logsumexp(terms, axis=0)
  residual = predicted - log_loss
  weights = np.exp(terms - predicted)  # d predicted / d term
  slope = np.clip(residual, -delta, delta)  # Huber's derivative
  gradient = np.array([
      np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
      -np.sum(slope * weights[0] * log_n), -np.sum(slope * weights[1] * log_d)])
  return np.sum(special.huber(delta, residual)), gradient


# scipy's L-BFGS-B stops once f falls by less than ftol x max(|f|, 1) a step. The Huber sum is
# about 1e-4, so its default ftol (2.2e-9) stops a start a few percent short in alpha; these
# options let a start converge, as a bootstrap refit from a single start needs.
LBFGS_OPTIONS = dict(ftol=1e-14, gtol=1e-10)
# Starts whose default-tolerance result is among the best this many are run on to convergence.
POLISHED_STARTS = 20


def fit_chinchilla(n, d, loss, *, delta: float = 1e-3, grid: dict | None = None) -> Chinchilla:
  """Huber loss on log L, L-BFGS from every grid point, best result kept (Hoffmann et al.).

  Every start first runs to scipy's default tolerance, which ranks the basins; the best
  POLISHED_STARTS then run on to LBFGS_OPTIONS'. Converging every one of the 4500 starts gave
  the same fit on the shipped sweep (docs/scaling) 4x slower.
  """
  log_n, log_d, log_loss = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(loss)
  args = (log_n, log_d, log_loss, delta)
  grid = CHINCHILLA_GRID if grid is None else grid
  ranked = []
  for alpha, beta, e, a, b in itertools.product(grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"]):
    result = optimize.minimize(_chinchilla_objective, [a, b, e, alpha, beta], args=args, method="L-BFGS-B",
                               jac=True)
    if np.isfinite(result.fun):
      ranked.append(result)
  ranked.sort(key=lambda result: result.fun)
  polished = [optimize.minimize(_chinchilla_objective, result.x, args=args, method="L-BFGS-B", jac=True,
                                options=LBFGS_OPTIONS) for result in ranked[:POLISHED_STARTS]]
  polished = [result for result in polished if np.isfinite(result.fun)]
  if not polished:
    raise ValueError("no start of the Chinchilla fit reached a finite loss; are the losses finite and positive?")
  a, b, e, alpha, beta = min(polished, key=lambda result: result.fun).x
  return Chinchilla(e=float(np.exp(e)), a=float(np.exp(a)), b=float(np.exp(b)), alpha=float(alpha),
                    beta=float(beta))


# A fitted E below this is log E running off toward -inf, where the losses fix no floor: refits
# started there cannot move it (the gradient in log E is E itself), so it gets no interval.
E_UNIDENTIFIED = 1e-6


def bootstrap_chinchilla(n, d, loss, fit: Chinchilla, *, samples: int = 200, seed: int = 0,
                         level: float = 0.95) -> dict[str, tuple[float, float] | None]:
  """Percentile confidence intervals from refits on runs resampled with replacement; None for
  an E the fit sent to 0 (E_UNIDENTIFIED).

  Each refit starts from the full fit (a one-point grid), which keeps this cheap.
  """
  n, d, loss = map(lambda x: np.asarray(x, float), (n, d, loss))
  rng = np.random.default_rng(seed)
  # E can fit to 0 (log E to -inf, where the data do not fix it): start such an E at the smallest float.
  log_e = np.log(max(fit.e, np.finfo(float).tiny))
  start = dict(alpha=[fit.alpha], beta=[fit.beta], e=[log_e], a=[np.log(fit.a)], b=[np.log(fit.b)])
  draws = []
  for _ in range(samples):
    idx = rng.integers(0, len(n), len(n))
    draws.append(dataclasses.astuple(fit_chinchilla(n[idx], d[idx], loss[idx], grid=start)))
  draws = np.array(draws)
  tail = (1 - level) / 2 * 100
  names = [f.name for f in dataclasses.fields(Chinchilla)]
  intervals = {name: (float(np.percentile(draws[:, i], tail)), float(np.percentile(draws[:, i], 100 - tail)))
               for i, name in enumerate(names)}
  return dict(intervals, e=None) if fit.e < E_UNIDENTIFIED else intervals


def points_by_compute(n, d) -> list[tuple[float, float]]:
  """The distinct (N, D) points, smallest compute N·D first: extrapolation holds out the last."""
  return sorted(set(zip(np.asarray(n, float), np.asarray(d, float))), key=lambda point: (point[0] * point[1], point))


def extrapolation_error(n, d, loss, *, holdout: int = 1, law: str = "chinchilla",
                        grid: dict | None = None) -> dict:
  """Fits `law` ("chinchilla" or Kaplan's joint "kaplan") without the runs of the `holdout`
  largest-compute (N, D) points, seed replicates included, and reports the error predicting them."""
  if law not in ("chinchilla", "kaplan"):
    raise ValueError(f"law={law!r} is not 'chinchilla' or 'kaplan'")
  n, d, loss = map(lambda x: np.asarray(x, float), (n, d, loss))
  points = points_by_compute(n, d)
  if not 1 <= holdout < len(points):
    raise ValueError(f"holdout={holdout} must leave some of the {len(points)} (N, D) points on each side")
  largest = set(points[-holdout:])
  held_out = np.array([point in largest for point in zip(n, d)])
  train, test = np.flatnonzero(~held_out), np.flatnonzero(held_out)
  if law == "chinchilla":
    fit = fit_chinchilla(n[train], d[train], loss[train], grid=grid)
  else:
    fit = fit_kaplan_joint(n[train], d[train], loss[train])
  predicted = fit(n[test], d[test])
  relative = (predicted - loss[test]) / loss[test]
  return {"law": law, "held_out_points": int(holdout), "held_out_runs": len(test), "predicted": predicted.tolist(),
          "measured": loss[test].tolist(), "relative_error": relative.tolist(),
          "max_abs_relative_error": float(np.max(np.abs(relative)))}


def r_squared(predicted, measured) -> float:
  """Fraction of the variance of log L the fit explains: 1 - residual / total sum of squares.

  Not the squared correlation, which scores a fit that is off by a constant factor as perfect.
  """
  log_predicted, log_measured = np.log(predicted), np.log(measured)
  residual = np.sum((log_measured - log_predicted) ** 2)
  return float(1 - residual / np.sum((log_measured - np.mean(log_measured)) ** 2))
