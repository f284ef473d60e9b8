"""From a sweep's results table to fitted laws, an extrapolation check and plots."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from models.config import ConfigError
from t5x_like.scaling import laws

RESULT_FIELDS = ("name", "non_embedding_params", "total_params", "tokens", "flops", "train_loss",
                 "validation_loss", "wall_seconds")


def load_results(sweep_dir: pathlib.Path) -> list[dict]:
  path = pathlib.Path(sweep_dir) / "results.json"
  if not path.exists():
    raise ConfigError(f"{path} does not exist; run `t5x-like sweep` into {sweep_dir} first")
  return json.loads(path.read_text())


def fit_report(rows: list[dict], *, loss_key: str = "validation_loss", bootstrap_samples: int = 200,
               grid: dict | None = None, holdout: int = 1) -> dict:
  """Kaplan (per-variable and joint) and Chinchilla fits with bootstrap intervals."""
  if bootstrap_samples < 1 or holdout < 1:
    raise ConfigError(f"bootstrap samples ({bootstrap_samples}) and held-out runs ({holdout}) must be at least 1")
  if any(loss_key not in r for r in rows):
    raise ConfigError(f"the results lack {loss_key!r}; the losses they hold are train_loss and validation_loss")
  n = np.array([r["non_embedding_params"] for r in rows], float)
  d = np.array([r["tokens"] for r in rows], float)
  loss = np.array([r[loss_key] for r in rows], float)
  report: dict = {"runs": len(rows), "loss": loss_key}
  # One-variable Kaplan laws use, for each N, the run with the most data (and vice versa),
  # where the other variable limits least.
  largest_d = {x: max((r for r in rows if r["non_embedding_params"] == x), key=lambda r: r["tokens"])
               for x in set(n)}
  largest_n = {x: max((r for r in rows if r["tokens"] == x), key=lambda r: r["non_embedding_params"])
               for x in set(d)}
  if len(largest_d) >= 2:
    law = laws.fit_power_law(sorted(largest_d), [largest_d[x][loss_key] for x in sorted(largest_d)])
    report["kaplan_n"] = {"n_c": law.scale, "alpha_n": law.alpha}
  if len(largest_n) >= 2:
    law = laws.fit_power_law(sorted(largest_n), [largest_n[x][loss_key] for x in sorted(largest_n)])
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
  if len(rows) > holdout + 5:
    report["extrapolation"] = laws.extrapolation_error(n, d, loss, holdout=holdout, grid=grid)
  return report


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
