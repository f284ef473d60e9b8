"""The XLA:CPU default that importing t5x_like sets, and the two ways a user keeps their own flags."""

import os
import subprocess
import sys

import pytest

FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def flags_after_import(**environment) -> str:
  """XLA_FLAGS as a fresh interpreter sees it after `import t5x_like`, under `environment`."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "T5X_LIKE_XLA_DEFAULTS")}
  env.update(environment)
  script = "import os, t5x_like; print(repr(os.environ.get('XLA_FLAGS')))"
  return eval(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout)


@pytest.mark.parametrize("environment, expected", [
    ({}, FLAG),
    # Flags already given come later, so a user's own ynn_fusion_type wins over the default.
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot_and_elementwise"},
     f"{FLAG} --xla_cpu_experimental_ynn_fusion_type=dot_and_elementwise"),
    ({"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FLAG}"},
     f"--xla_force_host_platform_device_count=8 {FLAG}"),  # inherited (a sweep worker): not added twice
    ({"T5X_LIKE_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     "--xla_force_host_platform_device_count=2"),
    ({"T5X_LIKE_XLA_DEFAULTS": "0"}, None),
])
def test_importing_sets_the_cpu_default_unless_told_not_to(environment, expected):
  assert flags_after_import(**environment) == expected
