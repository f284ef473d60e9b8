"""The fitters recover planted parameters from synthetic losses with multiplicative noise.

Tolerances: noise of 0.5% (sd of log L); exponents within 0.02 absolute, irreducible loss E
within 3%; fitted losses within 3 noise standard deviations (scales trade off against
the exponents, so they are checked through the losses they predict).
"""

import dataclasses
import json
import pathlib

import matplotlib.axes
import numpy as np
import pytest
from scipy import optimize

from models.config import ConfigError
from t5x_like.scaling import laws
from t5x_like.scaling.report import fit_report, plot

NOISE = 0.005
SMALL_GRID = laws.COARSE_GRID


def grid_runs(seed=0):
  n = np.repeat(np.logspace(6, 9, 6), 5)
  d = np.tile(np.logspace(8, 11, 5), 6)
  return n, d, np.exp(np.random.default_rng(seed).normal(0.0, NOISE, n.size))


def test_power_law_recovery():
  n, _, noise = grid_runs()
  truth = laws.PowerLaw(scale=8.8e13, alpha=0.076)
  fit = laws.fit_power_law(n, truth(n) * noise)
  assert fit.alpha == pytest.approx(truth.alpha, abs=0.02)
  np.testing.assert_allclose(fit(n), truth(n), rtol=3 * NOISE)


# Not Kaplan et al.'s own values, from which the joint fit also starts.
KAPLAN_TRUTH = laws.KaplanJoint(n_c=2e12, d_c=9e12, alpha_n=0.11, alpha_d=0.14)


def test_kaplan_joint_recovery():
  n, d, noise = grid_runs(1)
  fit = laws.fit_kaplan_joint(n, d, KAPLAN_TRUTH(n, d) * noise)
  assert fit.alpha_n == pytest.approx(KAPLAN_TRUTH.alpha_n, abs=0.02)
  assert fit.alpha_d == pytest.approx(KAPLAN_TRUTH.alpha_d, abs=0.02)
  np.testing.assert_allclose(fit(n, d), KAPLAN_TRUTH(n, d), rtol=3 * NOISE)


def test_kaplan_joint_fits_an_isoflop_design_where_loss_rises_with_n():
  """D = C / 6N for three budgets C: over all runs a bigger model saw less data, so the one-variable
  slope in N is negative, a start outside the exponents' bounds."""
  n = np.tile(np.logspace(6, 8, 6), 3)
  d = np.repeat([1e15, 1e16, 1e17], 6) / (6 * n)
  loss = KAPLAN_TRUTH(n, d) * np.exp(np.random.default_rng(4).normal(0.0, NOISE, n.size))
  assert laws.fit_power_law(n, loss).alpha < 0
  fit = laws.fit_kaplan_joint(n, d, loss)
  assert fit.alpha_n == pytest.approx(KAPLAN_TRUTH.alpha_n, abs=0.02)
  np.testing.assert_allclose(fit(n, d), KAPLAN_TRUTH(n, d), rtol=3 * NOISE)


@pytest.fixture(scope="module")
def chinchilla_data():
  n, d, noise = grid_runs(2)
  truth = laws.Chinchilla(e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fit
  return n, d, truth(n, d) * noise, truth


def test_chinchilla_recovery(chinchilla_data):
  n, d, loss, truth = chinchilla_data
  fit = laws.fit_chinchilla(n, d, loss, grid=SMALL_GRID)
  assert fit.alpha == pytest.approx(truth.alpha, abs=0.02)
  assert fit.beta == pytest.approx(truth.beta, abs=0.02)
  assert fit.e == pytest.approx(truth.e, rel=0.03)
  np.testing.assert_allclose(fit(n, d), truth(n, d), rtol=3 * NOISE)


def converged_from_every_start(n, d, loss, grid, delta=1e-3):
  """The slow reference: every start run to convergence, the best kept."""
  args = (np.log(n), np.log(d), np.log(loss), delta)
  starts = [[a, b, e, alpha, beta] for alpha in grid["alpha"] for beta in grid["beta"] for e in grid["e"]
            for a in grid["a"] for b in grid["b"]]
  best = min((optimize.minimize(laws._chinchilla_objective, start, args=args, method="L-BFGS-B", jac=True,
                                options=laws.LBFGS_OPTIONS) for start in starts), key=lambda result: result.fun)
  return best.fun, laws.Chinchilla(*np.exp(best.x[[2, 0, 1]]), *best.x[3:])


@pytest.mark.parametrize("data", ["synthetic", "shipped sweep"])
def test_polishing_the_best_starts_finds_the_fit_of_converging_every_start(chinchilla_data, data):
  if data == "synthetic":
    n, d, loss, _ = chinchilla_data
  else:
    rows = json.loads((pathlib.Path(__file__).parents[2] / "docs" / "scaling" / "results.json").read_text())
    n, d, loss = (np.array([row[key] for row in rows], float)
                  for key in ("non_embedding_params", "tokens", "validation_loss"))
  grid = dict(SMALL_GRID, e=[-1.0, 0.0, 1.0])  # 48 starts, more than are polished
  fit = laws.fit_chinchilla(n, d, loss, grid=grid)
  best, reference = converged_from_every_start(n, d, loss, grid)
  args = (np.log(n), np.log(d), np.log(loss), 1e-3)
  theta = [np.log(fit.a), np.log(fit.b), np.log(max(fit.e, 1e-300)), fit.alpha, fit.beta]
  assert laws._chinchilla_objective(np.array(theta), *args)[0] == pytest.approx(best, rel=1e-6)
  assert (fit.alpha, fit.beta) == pytest.approx((reference.alpha, reference.beta), abs=1e-4)
  np.testing.assert_allclose(fit(n, d), reference(n, d), rtol=1e-5)


def test_compute_optimal_allocation_minimises_loss_at_fixed_compute(chinchilla_data):
  truth = chinchilla_data[3]
  compute = 1e21
  n_opt, d_opt = truth.optimal_allocation(compute)
  assert 6 * n_opt * d_opt == pytest.approx(compute)
  numeric = optimize.minimize_scalar(lambda log_n: truth(np.exp(log_n), compute / (6 * np.exp(log_n))),
                                     bounds=(np.log(1e6), np.log(1e13)), method="bounded")
  assert np.log(n_opt) == pytest.approx(numeric.x, abs=1e-3)


def test_bootstrap_intervals_bracket_the_fit(chinchilla_data):
  n, d, loss, _ = chinchilla_data
  fit = laws.fit_chinchilla(n, d, loss, grid=SMALL_GRID)
  intervals = laws.bootstrap_chinchilla(n, d, loss, fit, samples=40)
  for name, (low, high) in intervals.items():
    assert low <= getattr(fit, name) <= high and low < high


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_bootstrap_intervals_are_the_refits_central_percentiles(level, monkeypatch):
  """Refit i gives alpha = i / 40 (a = 2 alpha): with 41 refits evenly spread over [0, 1], the
  central `level` interval of alpha is [(1 - level) / 2, (1 + level) / 2] exactly."""
  refits = iter(np.linspace(0.0, 1.0, 41))

  def refit(n, d, loss, grid):
    x = next(refits)
    return laws.Chinchilla(e=x, a=2 * x, b=x, alpha=x, beta=x)

  monkeypatch.setattr(laws, "fit_chinchilla", refit)
  fit = laws.Chinchilla(e=0.5, a=1.0, b=0.5, alpha=0.5, beta=0.5)
  intervals = laws.bootstrap_chinchilla(np.ones(4), np.ones(4), np.ones(4), fit, samples=41, level=level)
  tail = (1 - level) / 2
  assert intervals["alpha"] == pytest.approx((tail, 1 - tail))
  assert intervals["a"] == pytest.approx((2 * tail, 2 - 2 * tail))


def test_bootstrap_from_a_fit_whose_irreducible_loss_went_to_zero():
  """Losses with no floor: the fitted E underflows to 0.0, and its log is no start for the refits.
  Refits cannot move an E started there, so it gets no interval rather than [0, 0]."""
  n, d, noise = grid_runs(3)
  loss = laws.Chinchilla(e=0.0, a=406.4, b=410.7, alpha=0.34, beta=0.28)(n, d) * noise
  fit = dataclasses.replace(laws.fit_chinchilla(n, d, loss, grid=SMALL_GRID), e=0.0)
  intervals = laws.bootstrap_chinchilla(n, d, loss, fit, samples=10)
  assert intervals["alpha"][0] <= fit.alpha <= intervals["alpha"][1]
  assert intervals["e"] is None
  assert laws.bootstrap_chinchilla(n, d, loss, dataclasses.replace(fit, e=0.5), samples=2)["e"] is not None


def test_bootstrap_interval_width_matches_the_spread_over_fresh_noise():
  """A 95% interval is about 2 x 1.96 sampling standard deviations wide; the reference spread comes from
  refitting independent noise draws, which the bootstrap never sees (single-start refits that stop
  early give intervals several times too narrow)."""
  n, d, _ = grid_runs()
  truth = laws.Chinchilla(e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28)
  fits = [laws.fit_chinchilla(n, d, truth(n, d) * grid_runs(10 + seed)[2], grid=SMALL_GRID) for seed in range(8)]
  loss = truth(n, d) * grid_runs(9)[2]
  intervals = laws.bootstrap_chinchilla(n, d, loss, laws.fit_chinchilla(n, d, loss, grid=SMALL_GRID), samples=60)
  for name in ("alpha", "beta", "e", "a", "b"):
    spread = np.std([getattr(fit, name) for fit in fits], ddof=1)
    low, high = intervals[name]
    assert 0.5 < (high - low) / (2 * 1.96 * spread) < 2.0, name


def largest_raised(n, d, loss, holdout, factor=1.5):
  """The losses with the `holdout` largest-compute runs' raised by `factor`, and those runs: a fit
  that leaves them out still follows the law, one that read them would be dragged up."""
  largest = np.sort(np.argsort(n * d)[-holdout:])  # in the order of the runs, as the check lists them
  raised = loss.copy()
  raised[largest] *= factor
  return raised, largest


def test_extrapolation_to_held_out_largest_runs(chinchilla_data, monkeypatch):
  n, d, loss, truth = chinchilla_data
  check = laws.extrapolation_error(n, d, loss, holdout=3, grid=SMALL_GRID)
  assert check["held_out_runs"] == 3 and check["max_abs_relative_error"] < 0.02
  # The Huber loss shrugs off a few raised points, so the fit's inputs are watched as well.
  fitted, fit_chinchilla = [], laws.fit_chinchilla

  def watched(n, d, loss, **kwargs):
    fitted.append(set(zip(n, d)))
    return fit_chinchilla(n, d, loss, **kwargs)
  monkeypatch.setattr(laws, "fit_chinchilla", watched)
  raised, largest = largest_raised(n, d, loss, 3)
  check = laws.extrapolation_error(n, d, raised, holdout=3, grid=SMALL_GRID)
  assert fitted == [set(zip(n, d)) - set(zip(n[largest], d[largest]))]
  np.testing.assert_allclose(check["predicted"], truth(n[largest], d[largest]), rtol=3 * NOISE)
  assert check["max_abs_relative_error"] == pytest.approx(1 - 1 / 1.5, abs=0.02)
  # Seed replicates of a held-out point are held out with it, not left in the fit.
  twice = laws.extrapolation_error(np.tile(n, 2), np.tile(d, 2), np.concatenate([loss, loss * 1.001]),
                                   holdout=3, grid=SMALL_GRID)
  assert (twice["held_out_points"], twice["held_out_runs"]) == (3, 6)
  largest = np.argsort(n * d)[-3:]
  np.testing.assert_allclose(sorted(twice["measured"]), sorted(np.concatenate([loss[largest], 1.001 * loss[largest]])))


def test_a_non_finite_loss_is_left_out_named_not_fitted_from(chinchilla_data, caplog):
  n, d, loss, _ = chinchilla_data
  rows = [{"name": f"run{i}", "non_embedding_params": a, "tokens": b, "validation_loss": c}
          for i, (a, b, c) in enumerate(zip(n, d, loss))]
  rows[4]["validation_loss"], rows[7]["validation_loss"] = float("nan"), float("inf")
  report = fit_report(rows, bootstrap_samples=2, grid=SMALL_GRID, holdout=0)
  assert report["left_out"] == ["run4", "run7"] and "left out of the fits: run4, run7" in caplog.text
  kept = np.isfinite([r["validation_loss"] for r in rows])
  expected = laws.fit_chinchilla(n[kept], d[kept], loss[kept], grid=SMALL_GRID)
  assert report["chinchilla"]["alpha"] == pytest.approx(expected.alpha, rel=1e-9)
  # The fitter itself no longer returns its first grid start when every start's loss is NaN.
  with pytest.raises(ValueError, match="no start of the Chinchilla fit reached a finite loss"):
    laws.fit_chinchilla(n, d, np.where(kept, loss, np.nan), grid=SMALL_GRID)


@pytest.mark.parametrize("sizes, budgets, message", [
    (2, 2, r"these results have 4 points, 2 sizes and 2 budgets"),  # fewer points than 6
    (1, 6, r"these results have 6 points, 1 sizes and 6 budgets"),  # a single model size
])
def test_fits_refuse_too_few_points_to_determine_them(sizes, budgets, message):
  rows = [{"name": f"{a}_{b}", "non_embedding_params": 1e6 * (a + 1), "tokens": 1e8 * (b + 1),
           "validation_loss": 3.0 - 0.1 * a - 0.1 * b} for a in range(sizes) for b in range(budgets)]
  with pytest.raises(ConfigError, match=r"the fits need 6 or more \(N, D\) points .*" + message):
    fit_report(rows)


def test_a_holdout_that_leaves_too_few_points_is_reported_skipped(chinchilla_data):
  n, d, loss, _ = chinchilla_data
  rows = [{"name": str(i), "non_embedding_params": a, "tokens": b, "validation_loss": c}
          for i, (a, b, c) in enumerate(zip(n, d, loss))]
  report = fit_report(rows, bootstrap_samples=2, grid=SMALL_GRID, holdout=25)
  assert report["extrapolation"] == {"skipped": "holding out 25 of 30 points would leave 5, fewer than the 6 "
                                                "a fit needs"}


def test_a_holdout_that_leaves_one_model_size_is_reported_skipped():
  """Two sizes by six budgets: the six largest-compute points are the large model's, and a fit of
  the small model's alone has no N to find alpha and A from (it predicted 7.75 for a loss of 4.82)."""
  truth = laws.Chinchilla(e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28)
  n, d = (a.ravel() for a in np.meshgrid([1e6, 1e8], np.logspace(8, 10, 6)))
  rows = [{"name": str(i), "non_embedding_params": a, "tokens": b, "validation_loss": c}
          for i, (a, b, c) in enumerate(zip(n, d, truth(n, d)))]
  assert {a for a, _ in laws.points_by_compute(n, d)[:6]} == {1e6}
  report = fit_report(rows, bootstrap_samples=2, grid=SMALL_GRID, holdout=6)
  assert report["extrapolation"] == {"skipped": "the 6 points left after holding out 6 share one N, which leaves "
                                                "its exponent and coefficient undetermined"}
  assert "skipped" not in fit_report(rows, bootstrap_samples=2, grid=SMALL_GRID, holdout=1)["extrapolation"]


def test_kaplan_extrapolation_to_held_out_largest_runs():
  n, d, noise = grid_runs(3)
  loss = KAPLAN_TRUTH(n, d) * noise
  check = laws.extrapolation_error(n, d, loss, holdout=3, law="kaplan")
  assert check["law"] == "kaplan" and check["max_abs_relative_error"] < 0.02
  raised, largest = largest_raised(n, d, loss, 3)
  check = laws.extrapolation_error(n, d, raised, holdout=3, law="kaplan")
  np.testing.assert_allclose(check["predicted"], KAPLAN_TRUTH(n[largest], d[largest]), rtol=3 * NOISE)
  with pytest.raises(ValueError, match="law='kaplan_joint'"):
    laws.extrapolation_error(n, d, loss, law="kaplan_joint")


def test_chinchilla_grid_is_hoffmann_et_al_appendix_d2():
  grid = laws.CHINCHILLA_GRID
  np.testing.assert_allclose(grid["e"], [-1, -0.5, 0, 0.5, 1])
  for exponent in ("alpha", "beta"):
    np.testing.assert_allclose(grid[exponent], [0, 0.5, 1, 1.5, 2])
  for log_coefficient in ("a", "b"):
    np.testing.assert_allclose(grid[log_coefficient], [0, 5, 10, 15, 20, 25])
  assert sorted(grid) == ["a", "alpha", "b", "beta", "e"]
  assert np.prod([len(values) for values in grid.values()]) == 4500


def test_r_squared_is_the_explained_fraction_of_log_variance():
  measured = np.array([4.0, 3.0, 2.5, 2.2])
  assert laws.r_squared(measured, measured) == 1.0
  # A fit off by a constant factor correlates perfectly but explains less than all the variance.
  log_measured = np.log(measured)
  expected = 1 - len(measured) * np.log(1.1) ** 2 / np.sum((log_measured - log_measured.mean()) ** 2)
  assert laws.r_squared(1.1 * measured, measured) == pytest.approx(expected)
  assert laws.r_squared(np.full(4, np.exp(log_measured.mean())), measured) == pytest.approx(0.0)


def test_report_and_plots(chinchilla_data, tmp_path, monkeypatch):
  """Train losses 10% above validation's and PaLM FLOPs 3x 6ND, so a fit or plot reading the
  wrong column shows."""
  n, d, loss, _ = chinchilla_data
  rows = [{"name": f"run{i}", "non_embedding_params": a, "total_params": a * 1.2, "tokens": b,
           "flops": 18 * a * b, "train_loss": 1.1 * c, "validation_loss": c, "wall_seconds": 1.0}
          for i, (a, b, c) in enumerate(zip(n, d, loss))]
  report = fit_report(rows, bootstrap_samples=20, grid=SMALL_GRID)
  assert report["loss"] == "validation_loss" and report["chinchilla"]["e"] == pytest.approx(1.69, rel=0.03)
  assert report["chinchilla"]["alpha"] == pytest.approx(0.34, abs=0.02)
  # The frontier: at each compute, the N that minimises the reported law along 6ND = C (scipy's
  # minimiser), from the smallest run's compute to 100x the largest's.
  reported = laws.Chinchilla(**{key: report["chinchilla"][key] for key in ("e", "a", "b", "alpha", "beta")})
  frontier = report["compute_optimal"]
  assert [point["compute_6nd"] for point in (frontier[0], frontier[-1])] == pytest.approx(
      [(6 * n * d).min(), 100 * (6 * n * d).max()])
  for point in frontier:
    assert 6 * point["n"] * point["d"] == pytest.approx(point["compute_6nd"])
    c = point["compute_6nd"]
    numeric = optimize.minimize_scalar(lambda log_n: reported(np.exp(log_n), c / (6 * np.exp(log_n))),
                                       bounds=(np.log(1e3), np.log(1e16)), method="bounded")
    assert np.log(point["n"]) == pytest.approx(numeric.x, abs=1e-3)
  assert report["kaplan_n"]["alpha_n"] > 0 and report["kaplan_d"]["alpha_d"] > 0
  assert report["extrapolation"]["max_abs_relative_error"] < 0.02
  json.dumps(report)  # serialisable as the fit report file
  scattered = []
  scatter = matplotlib.axes.Axes.scatter
  monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda axis, x, y, **kw: scattered.append((x, y))
                      or scatter(axis, x, y, **kw))
  for path in plot(rows, report, tmp_path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
  (x, y), = scattered  # the loss-against-compute runs, at the compute the frontier spends
  np.testing.assert_allclose(x, 6 * n * d)
  np.testing.assert_allclose(y, loss)


def test_one_variable_laws_read_each_sizes_largest_budget_and_average_its_replicates():
  """L = 5 N^-0.08 D^-0.1 on a 4 x 4 grid, two replicates a point at -+10% (their mean is the law),
  and every point off the largest N and the largest D raised 30%: the one-variable fits must take,
  for each N, the most data (and for each D, the largest model) to recover 0.08 and 0.1."""
  sizes, budgets = [1e6, 4e6, 1.6e7, 6.4e7], [1e8, 4e8, 1.6e9, 6.4e9]
  rows = []
  for n in sizes:
    for d in budgets:
      law = 5 * n ** -0.08 * d ** -0.1
      if n != sizes[-1] and d != budgets[-1]:
        law *= 1.3
      rows += [{"non_embedding_params": n, "tokens": d, "validation_loss": law * (1 + e)} for e in (-0.1, 0.1)]
  report = fit_report(rows, bootstrap_samples=2, grid=SMALL_GRID, holdout=0)
  assert report["kaplan_n"]["alpha_n"] == pytest.approx(0.08, rel=1e-6)
  assert report["kaplan_d"]["alpha_d"] == pytest.approx(0.1, rel=1e-6)
  # L = (N_c / N)^alpha_n at the largest budget: N_c^0.08 = 5 x 6.4e9^-0.1.
  assert report["kaplan_n"]["n_c"] == pytest.approx((5 * budgets[-1] ** -0.1) ** (1 / 0.08), rel=1e-4)


@pytest.mark.parametrize("options, message", [
    (dict(holdout=-1), r"held-out points \(-1\) at least 0"),
    (dict(bootstrap_samples=0), r"bootstrap samples \(0\) must be at least 1"),
    (dict(loss_key="test_loss"), "the results lack 'test_loss'"),
])
def test_report_refuses_options_it_cannot_honour(options, message):
  rows = [{"non_embedding_params": 1e6, "tokens": 1e9, "validation_loss": 3.0}]
  with pytest.raises(ConfigError, match=message):
    fit_report(rows, **options)
