"""Runs the trainer on PatternLoader data in its own process (for kill/resume and
multi-process tests): python run_fake_training.py WORKDIR CONFIG_JSON [PROCESS_ID NUM_PROCESSES PORT].

With EVALUATION_OUT set, process 0 then writes the split's and a text's evaluation there as JSON.
"""

import json
import os
import sys

if len(sys.argv) > 3:  # four devices per process; the test's other flags kept (the last count wins)
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from t5x_like import distributed  # noqa: E402

if len(sys.argv) > 3:
  process_id, num_processes, port = map(int, sys.argv[3:6])
  distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

sys.path.insert(0, os.path.dirname(__file__))
from fake_data import CharacterTokenizer, PatternLoader  # noqa: E402
from trainer_configs import tiny_config  # noqa: E402

import jax  # noqa: E402

from t5x_like import checkpoints, evaluation, preemption  # noqa: E402
from t5x_like.preemption import Preempted  # noqa: E402
from t5x_like.trainer import Trainer  # noqa: E402

overrides = json.loads(sys.argv[2])
trainer = Trainer(tiny_config(**overrides), sys.argv[1], make_loader=PatternLoader)
try:
  trainer.train()
except Preempted as error:  # as the train command ends
  print(error)
  sys.exit(preemption.EXIT_STATUS)
if os.environ.get("EVALUATION_OUT"):
  tokenizer = CharacterTokenizer()
  results = {"split": evaluation.evaluate_split(trainer, tokenizer, "validation", num_batches=2),
             "text": evaluation.evaluate_documents(trainer, tokenizer, [CharacterTokenizer.TEXT])}
  # Saves gather data positions whose JSON grows; a new length must not compile a new gather.
  compiles = []

  def count_compiles(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(count_compiles)
  for length in (10, 40, 100):
    checkpoints.gather_data_positions({"position": "x" * length})
  results["gather_compiles"] = len(compiles)
  if jax.process_index() == 0:
    with open(os.environ["EVALUATION_OUT"], "w") as file:
      json.dump(results, file)
