"""Hugging Face checkpoints to and from our models: GPT-2, LLaMA, BERT and T5.

`import_from_hf` builds our model from a transformers model, its config mapped by
`config_from_hf` and its weights copied exactly; `export_to_hf` writes our weights
back as a state dict that the HF model's `load_state_dict` accepts. Nothing here
imports transformers or torch: a converter reads only the config and `state_dict()`
of the model it is given.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.huggingface import bert, common, gpt2, llama, t5
from models.huggingface.common import UnsupportedCheckpoint
from models.transformer import build_model

FAMILIES = {"gpt2": gpt2, "llama": llama, "bert": bert, "t5": t5}
# ModelConfig fields that change how the weights compute or train, not what they are.
OVERRIDABLE = frozenset({"dtype", "param_dtype", "bf16_matmul_inputs", "attention_kernel", "loss_kernel", "remat",
                         "dropout_rate", "attention_dropout_rate", "mlp_dropout_rate", "final_dropout"})


def _family(model_type: str):
  if model_type not in FAMILIES:
    raise UnsupportedCheckpoint(f"no converter for model_type={model_type!r}; supported: {sorted(FAMILIES)}")
  return FAMILIES[model_type]


def config_from_hf(hf_config) -> ModelConfig:
  """Our config for a transformers config; options we cannot reproduce are an error."""
  return _family(hf_config.model_type).config_from_hf(hf_config)


def import_from_hf(hf_model, **overrides) -> nnx.Module:
  """Our model holding hf_model's weights, in eval mode (dropout off) like from_pretrained.

  Whether the output projection is tied is read from the model, not its config:
  transformers 5 ties T5's lm_head to the shared table unless the checkpoint it was
  loaded from stores a different one. `overrides` are ModelConfig fields that leave
  the weights alone (OVERRIDABLE), e.g. dtype="bfloat16" or dropout_rate=0.0.
  """
  refused = sorted(set(overrides) - OVERRIDABLE)
  if refused:
    raise UnsupportedCheckpoint(f"import_from_hf cannot override {refused}: the checkpoint fixes them; "
                                f"these may be overridden: {sorted(OVERRIDABLE)}")
  family = _family(hf_model.config.model_type)
  if type(hf_model).__name__ != family.HF_CLASS:
    raise UnsupportedCheckpoint(
        f"model_type={hf_model.config.model_type!r} converts from {family.HF_CLASS}, "
        f"got {type(hf_model).__name__}")
  tied = hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
  cfg = family.config_from_hf(hf_model.config).replace(tie_embeddings=tied, **overrides)
  model = build_model(cfg)
  common.load(model, family.tensors(model), common.hf_state_dict(hf_model))
  model.eval()
  return model


def export_to_hf(model: nnx.Module) -> dict[str, np.ndarray]:
  """model's weights under HF names and shapes, tied entries repeated as HF lists them.

  The family is the one whose fixed architecture fields (`FIXED`) the config matches.
  """
  cfg = model.config
  mismatches = {}
  for name, family in FAMILIES.items():
    wrong = {field: getattr(cfg, field) for field, value in family.FIXED.items() if _differs(cfg, field, value)}
    if not wrong:
      return common.export(family.tensors(model))
    mismatches[name] = wrong
  raise UnsupportedCheckpoint(
      f"the model config matches no Hugging Face family; fields that differ: {mismatches}")


def _differs(cfg, field: str, fixed) -> bool:
  """Whether a config's field differs from a family's fixed value. A family's None kv heads and
  head dim are the defaults (every head its own keys, emb_dim / num_heads), which a config
  spelling them out has too."""
  if field == "num_kv_heads" and fixed is None:
    return cfg.kv_heads != cfg.num_heads
  if field == "head_dim" and fixed is None:
    return cfg.dim_per_head * cfg.num_heads != cfg.emb_dim
  return getattr(cfg, field) != fixed
