"""Multi-process start-up: a half-described run fails before jax.distributed starts."""

import pytest

from models.config import ConfigError
from t5x_like import distributed


def test_process_flags_without_a_coordinator_are_refused(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ConfigError, match="--num_processes and --process_id need --coordinator_address"):
    distributed.initialize(None, 2, 1)
  with pytest.raises(ConfigError, match="coordinator address 127.0.0.1:1234 given without --num_processes"):
    distributed.initialize("127.0.0.1:1234", None, None)
  distributed.initialize(None, None, None)  # a single-process run: nothing to start
