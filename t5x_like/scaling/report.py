"""From a sweep's results table to fitted laws, an extrapolation check and plots."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np

from models.config import ConfigError
from t5x_like.scaling import laws

logger = logging.getLogger(__name__)

# tokens: every token slot of every batch whose update was applied, padding included (a few
# percent when packed), as the FLOPs count them; wall_seconds: the run that finished the point
# (a resumed one's last part).
RESULT_FIELDS = ("name", "non_embedding_params", "total_params", "tokens", "flops", "train_loss",
                 "validation_loss", "wall_seconds")


def load_results(sweep_dir: pathlib.Path) -> list[dict]:
  path = pathlib.Path(sweep_dir) / "results.json"
  if not path.is_file():
    raise ConfigError(f"{path} is not a file; run `t5x-like sweep` into {sweep_dir} first")
  rows = _json(path, "rerun `t5x-like sweep` into the directory to rebuild it from the points")
  if not isinstance(rows, list):
    raise ConfigError(f"{path} is not a list of results; rerun `t5x-like sweep` to rebuild it")
  for row in rows:
    check_result(row, path)
  return rows


def read_result(path: pathlib.Path) -> dict:
  """A finished point's result.json, checked as fit will read it."""
  row = _json(path, "remove it and rerun the sweep to write it again (from the point's last checkpoint)")
  check_result(row, path)
  return row


def _json(path: pathlib.Path, remedy: str):
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ConfigError(f"{path} is not valid JSON ({error}); {remedy}") from None


def check_result(row, path: pathlib.Path) -> None:
  """Every field, the sizes positive numbers and the losses numbers (NaN for a diverged run)."""
  if not isinstance(row, dict) or set(RESULT_FIELDS) - set(row):
    missing = sorted(set(RESULT_FIELDS) - set(row)) if isinstance(row, dict) else list(RESULT_FIELDS)
    raise ConfigError(f"{path}: a result lacks {missing}: {str(row)[:200]}")
  for field in RESULT_FIELDS[1:]:
    value = row[field]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if field in ("train_loss", "validation_loss") and not number:
      raise ConfigError(f"{path}: {row['name']}'s {field}={value!r} is not a number")
    if field not in ("train_loss", "validation_loss") and not (number and value > 0):
      raise ConfigError(f"{path}: {row['name']}'s {field}={value!r} is not a positive number")


# Chinchilla's law has 5 parameters: fewer distinct (N, D) points than 6 fit it exactly, with
# intervals that mean nothing.
MIN_POINTS = 6


def fit_report(rows: list[dict], *, loss_key: str = "validation_loss", bootstrap_samples: int = 200,
               grid: dict | None = None, holdout: int = 1) -> dict:
  """Kaplan (per-variable and joint) and Chinchilla fits with bootstrap intervals. Runs whose
  loss is not a finite positive number (a diverged run) are left out and named; seed replicates
  are separate runs in the fits and averaged in the one-variable laws."""
  if bootstrap_samples < 1 or holdout < 0:
    raise ConfigError(f"bootstrap samples ({bootstrap_samples}) must be at least 1 and held-out points "
                      f"({holdout}) at least 0")
  if any(loss_key not in r for r in rows):
    raise ConfigError(f"the results lack {loss_key!r}; the losses they hold are train_loss and validation_loss")
  usable = [bool(np.isfinite(r[loss_key]) and r[loss_key] > 0) for r in rows]  # a log of it is fitted
  dropped = [r.get("name", str(i)) for i, (r, ok) in enumerate(zip(rows, usable)) if not ok]
  if dropped:
    logger.warning("left out of the fits: %s (%s not a finite positive number)", ", ".join(dropped), loss_key)
  rows = [r for r, ok in zip(rows, usable) if ok]
  n = np.array([r["non_embedding_params"] for r in rows], float)
  d = np.array([r["tokens"] for r in rows], float)
  loss = np.array([r[loss_key] for r in rows], float)
  points = sorted(set(zip(n, d)))
  if len(points) < MIN_POINTS or len(set(n)) < 2 or len(set(d)) < 2:
    raise ConfigError(f"the fits need {MIN_POINTS} or more (N, D) points with finite {loss_key}, over 2 or more "
                      f"model sizes and token budgets; these results have {len(points)} points, {len(set(n))} "
                      f"sizes and {len(set(d))} budgets")
  report: dict = {"runs": len(rows), "points": len(points), "loss": loss_key, "left_out": dropped}
  # One-variable Kaplan laws use, for each N, the point with the most data (and vice versa),
  # where the other variable limits least; its replicates' mean loss.
  try:
    mean_loss = {point: float(np.mean(loss[(n == point[0]) & (d == point[1])])) for point in points}
    largest_d = {x: max(b for a, b in points if a == x) for x in sorted(set(n))}
    largest_n = {x: max(a for a, b in points if b == x) for x in sorted(set(d))}
    law = laws.fit_power_law(list(largest_d), [mean_loss[(x, largest_d[x])] for x in largest_d])
    report["kaplan_n"] = {"n_c": law.scale, "alpha_n": law.alpha}
    law = laws.fit_power_law(list(largest_n), [mean_loss[(largest_n[x], x)] for x in largest_n])
    report["kaplan_d"] = {"d_c": law.scale, "alpha_d": law.alpha}
    joint = laws.fit_kaplan_joint(n, d, loss)
    report["kaplan_joint"] = dict(dataclasses.asdict(joint), r_squared=laws.r_squared(joint(n, d), loss))
    chinchilla = laws.fit_chinchilla(n, d, loss, grid=grid)
    intervals = laws.bootstrap_chinchilla(n, d, loss, chinchilla, samples=bootstrap_samples)
    report["chinchilla"] = dict(dataclasses.asdict(chinchilla), r_squared=laws.r_squared(chinchilla(n, d), loss),
                                confidence_95=intervals)
    compute = np.logspace(np.log10((6 * n * d).min()), np.log10((6 * n * d).max() * 100), 5)
    n_opt, d_opt = chinchilla.optimal_allocation(compute)
    # Compute here is Chinchilla's C = 6ND (N non-embedding), not the results' PaLM FLOP count.
    report["compute_optimal"] = [{"compute_6nd": float(c), "n": float(a), "d": float(b)}
                                 for c, a, b in zip(compute, n_opt, d_opt)]
    skipped = _why_not_extrapolate(n, d, holdout) if holdout else None
    if holdout and not skipped:
      report["extrapolation"] = laws.extrapolation_error(n, d, loss, holdout=holdout, grid=grid)
  except ConfigError:
    raise
  except (ValueError, np.linalg.LinAlgError) as error:  # scipy's fits of non-finite residuals
    raise ConfigError(f"the laws could not be fitted to these {loss_key} values ({str(error)[:200]}); losses "
                      f"that barely change with N and D (models that did not learn) follow no power law") from None
  if skipped:
    report["extrapolation"] = {"skipped": skipped}
  return report


def _why_not_extrapolate(n, d, holdout: int) -> str | None:
  """Why the points left after holding out the largest `holdout` cannot be fitted, or None."""
  points = laws.points_by_compute(n, d)
  kept = points[:-holdout] if holdout < len(points) else []
  if len(kept) < MIN_POINTS:
    return (f"holding out {holdout} of {len(points)} points would leave {len(kept)}, fewer than the {MIN_POINTS} "
            f"a fit needs")
  for name, values in (("N", {a for a, _ in kept}), ("D", {b for _, b in kept})):
    if len(values) < 2:  # the largest compute points are often all of the largest model's
      return (f"the {len(kept)} points left after holding out {holdout} share one {name}, which leaves its "
              f"exponent and coefficient undetermined")
  return None


def plot(rows: list[dict], report: dict, out_dir: pathlib.Path, *, loss_key: str = "validation_loss"):
  """loss_vs_n.png (a line per D), loss_vs_d.png (a line per N), loss_vs_compute.png (frontier)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fit = laws.Chinchilla(**{k: report["chinchilla"][k] for k in ("e", "a", "b", "alpha", "beta")})
  paths = []
  for x_key, line_key, label, name in (("non_embedding_params", "tokens", "D", "loss_vs_n.png"),
                                       ("tokens", "non_embedding_params", "N", "loss_vs_d.png")):
    figure, axis = plt.subplots(figsize=(6, 4))
    for line in sorted({r[line_key] for r in rows}):
      points = sorted((r[x_key], r[loss_key]) for r in rows if r[line_key] == line)
      xs = np.array([p[0] for p in points])
      (handle,) = axis.plot(xs, [p[1] for p in points], "o", label=f"{label} = {line:.3g}")
      grid = np.logspace(np.log10(xs.min()), np.log10(xs.max()), 50)
      fitted = fit(grid, line) if x_key == "non_embedding_params" else fit(line, grid)
      axis.plot(grid, fitted, "-", color=handle.get_color(), alpha=0.6)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("non-embedding parameters N" if label == "D" else "tokens D")
    axis.set_ylabel(loss_key.replace("_", " "))
    axis.legend(fontsize=7)
    axis.set_title("points: runs; lines: Chinchilla fit")
    figure.tight_layout()
    figure.savefig(out_dir / name, dpi=120)
    plt.close(figure)
    paths.append(out_dir / name)

  # Runs and frontier on one axis, the C = 6ND that optimal_allocation spends; the results'
  # `flops` (PaLM's count, attention and vocabulary projection included) is up to 20x that
  # for the smallest models, and would draw the frontier far below every run.
  figure, axis = plt.subplots(figsize=(6, 4))
  compute = np.array([6 * r["non_embedding_params"] * r["tokens"] for r in rows], float)
  axis.scatter(compute, [r[loss_key] for r in rows], c=np.log10([r["non_embedding_params"] for r in rows]),
               cmap="viridis", label="runs (colour: log10 N)")
  frontier = np.logspace(np.log10(compute.min()), np.log10(compute.max() * 10), 60)
  n_opt, d_opt = fit.optimal_allocation(frontier)
  axis.plot(frontier, fit(n_opt, d_opt), "k-", label="fitted compute-optimal frontier")
  axis.set_xscale("log")
  axis.set_yscale("log")
  axis.set_xlabel("compute C = 6 N D (N non-embedding)")
  axis.set_ylabel(loss_key.replace("_", " "))
  axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(out_dir / "loss_vs_compute.png", dpi=120)
  plt.close(figure)
  paths.append(out_dir / "loss_vs_compute.png")
  return paths
