"""Peer JAX trainers timed side by side with ours: MaxText, EasyDeL and Hugging Face's Flax GPT-2.

Each peer runs in a virtual environment of its own, with its own pinned jax, never ours: the
peers pin jax versions that conflict with ours and with each other, and none of them is a
dependency of this project. The environments are built on first use under a cache folder;
the runners in bench/peers/ train a decoder of the requested shape and print one JSON line.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

RUNNERS = pathlib.Path(__file__).resolve().parent / "peers"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/t5x_like/bench_venvs").expanduser()
PEERS = ("maxtext", "easydel", "hf_flax_gpt2")

# (Python version, pinned requirements). MaxText needs Python 3.12 and jax >= 0.11.1, and
# brings its dependencies only with an extra ([tpu] carries the CPU jaxlib as well);
# EasyDeL pins jax 0.9.2 and imports Pillow and torch without declaring them (torch's CPU
# wheel); transformers 5 dropped Flax, and 4.46 runs on our jax 0.10.2.
INSTALLS = {
    "maxtext": ("3.12", ("maxtext[tpu]==0.2.5", "jax==0.12.0.1", "jaxlib==0.12.0.1", "flax==0.12.12",
                         "optax==0.2.8")),
    "easydel": ("3.11", ("easydel==0.3.0", "jax==0.9.2", "jaxlib==0.9.2", "flax==0.12.3", "optax==0.2.8",
                         "pillow==13.0.0", "torch==2.13.0")),
    "hf_flax_gpt2": ("3.11", ("transformers==4.46.3", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8",
                              "optax==0.2.8")),
}
COMPLETE_MARKER = "t5x_like_install_complete"


def _find_python(version: str) -> str:
  """An interpreter of that version: ours, one on PATH, or one pyenv installed."""
  candidates = [sys.executable] if f"{sys.version_info.major}.{sys.version_info.minor}" == version else []
  candidates.append(shutil.which(f"python{version}"))
  pyenv_versions = pathlib.Path("~/.pyenv/versions").expanduser()
  candidates += sorted(map(str, pyenv_versions.glob(f"{version}.*/bin/python{version}")))
  for python in filter(None, candidates):
    if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:  # not a pyenv shim
      return python
  raise RuntimeError(f"peer benchmarks need python{version}, which is neither on PATH nor under ~/.pyenv")


def ensure_venv(name: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> str:
  """Path of the peer's Python, building <cache_dir>/<name> first unless a complete install is there.

  The marker holds the install command, so a half-finished install or one with other pins is redone.
  """
  version, requirements = INSTALLS[name]
  venv = pathlib.Path(cache_dir).expanduser() / name
  python = venv / "bin" / "python"
  marker = venv / COMPLETE_MARKER
  pip_command = f"pip install {' '.join(requirements)}"
  if marker.exists() and marker.read_text() == pip_command:
    return str(python)
  print(f"installing peer {name!r} into {venv} (minutes): {pip_command}", file=sys.stderr)
  shutil.rmtree(venv, ignore_errors=True)
  venv.parent.mkdir(parents=True, exist_ok=True)
  for command in ([_find_python(version), "-m", "venv", str(venv)], [str(python), "-m", *pip_command.split()]):
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
      raise RuntimeError(f"installing peer {name!r} into {venv} failed: {' '.join(command)}\n"
                         f"{result.stdout[-3000:]}")
  marker.write_text(pip_command)
  return str(python)


def run_peer(name: str, shape: dict, vocab: int, dtype: str, steps: int, warmup: int,
             cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, timeout_s: float = 3600) -> dict:
  """Trains the peer at `shape` (emb_dim, num_layers, num_heads, mlp_dim, seq_len, batch_size) for
  `warmup` untimed then `steps` timed steps in its own venv; its JSON line as a dict.
  RuntimeError with stderr's tail on failure."""
  command = [
      ensure_venv(name, cache_dir), str(RUNNERS / f"{name}_runner.py"),
      "--emb-dim", shape["emb_dim"], "--layers", shape["num_layers"], "--heads", shape["num_heads"],
      "--mlp-dim", shape["mlp_dim"], "--seq", shape["seq_len"], "--batch", shape["batch_size"],
      "--vocab", vocab, "--steps", steps, "--warmup", warmup, "--dtype", dtype,
  ]
  # One CPU device, as ours is timed on: no simulated devices inherited from the caller.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  try:
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=timeout_s)
  except subprocess.TimeoutExpired as error:
    stderr = (error.stderr or b"").decode(errors="replace")  # bytes even with text=True
    raise RuntimeError(f"peer {name!r} ran past {timeout_s} s:\n{stderr[-3000:]}") from None
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    raise RuntimeError(f"peer {name!r} exited {result.returncode} without its JSON line; "
                       f"command: {' '.join(map(str, command))}\n{result.stderr[-3000:]}")
  return json.loads(lines[-1])
