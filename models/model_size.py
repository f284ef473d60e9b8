"""Parameter counts and training FLOPs as functions of the config alone.

Used for scaling-law sweeps (Kaplan et al. 2020 count N without embeddings) and for
MFU (PaLM, Chowdhery et al. 2022, app. B: 6 FLOPs per matmul parameter per token plus
12 * layers * context * attention width for QK^T and AV, recomputation not counted).
"""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelSize:
  total_params: int
  # Token, position and token-type tables, and an untied output projection: the
  # parameters Kaplan et al. leave out of N.
  embedding_params: int
  # Weights every token is multiplied by, the vocabulary projection included (PaLM).
  matmul_params: int

  @property
  def non_embedding_params(self) -> int:
    """Kaplan et al.'s N."""
    return self.total_params - self.embedding_params


def _dense(cfg: ModelConfig, fan_in: int, fan_out: int) -> tuple[int, int]:
  """(all parameters, matmul parameters) of one projection."""
  return fan_in * fan_out + (fan_out if cfg.use_bias else 0), fan_in * fan_out


def _norm(cfg: ModelConfig) -> int:
  return cfg.emb_dim * (2 if cfg.norm == "layernorm" else 1)


def _attention(cfg: ModelConfig) -> tuple[int, int]:
  d, q_width, kv_width = cfg.emb_dim, cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
  parts = [_dense(cfg, d, q_width), _dense(cfg, d, kv_width), _dense(cfg, d, kv_width), _dense(cfg, q_width, d)]
  return sum(p for p, _ in parts), sum(m for _, m in parts)


def _mlp(cfg: ModelConfig) -> tuple[int, int]:
  parts = [_dense(cfg, cfg.emb_dim, cfg.mlp_dim)] * (2 if cfg.mlp_gated else 1)
  parts.append(_dense(cfg, cfg.mlp_dim, cfg.emb_dim))
  return sum(p for p, _ in parts), sum(m for _, m in parts)


def _stack(cfg: ModelConfig, num_layers: int, *, cross_attention: bool) -> tuple[int, int, int]:
  """(all, embedding, matmul) parameters of one stack, as models.transformer.Stack builds it."""
  attn, attn_mm = _attention(cfg)
  mlp, mlp_mm = _mlp(cfg)
  block = attn + mlp + 2 * _norm(cfg)
  block_mm = attn_mm + mlp_mm
  if cross_attention:
    block, block_mm = block + attn + _norm(cfg), block_mm + attn_mm
  total, embedding = num_layers * block, 0
  if cfg.position == "learned":
    embedding += cfg.max_len * cfg.emb_dim
  if cfg.position == "relative":
    total += cfg.relative_num_buckets * cfg.num_heads
  if cfg.num_token_types and not cross_attention:
    embedding += cfg.num_token_types * cfg.emb_dim
  if cfg.embedding_norm:
    total += _norm(cfg)
  if cfg.norm_position == "pre":
    total += _norm(cfg)
  return total + embedding, embedding, num_layers * block_mm


def model_size(cfg: ModelConfig) -> ModelSize:
  vocab_table = cfg.vocab_size * cfg.emb_dim
  total = embedding = vocab_table
  matmul = vocab_table  # the output projection, tied or not
  if not cfg.tie_embeddings:
    total, embedding = total + vocab_table, embedding + vocab_table
  stacks = {
      "decoder": [(cfg.num_layers, False)],
      "encoder": [(cfg.num_layers, False)],
      "encoder_decoder": [(cfg.num_layers, False), (cfg.decoder_layers, True)],
  }[cfg.arch]
  for num_layers, cross in stacks:
    s_total, s_embedding, s_matmul = _stack(cfg, num_layers, cross_attention=cross)
    total, embedding, matmul = total + s_total, embedding + s_embedding, matmul + s_matmul
  if cfg.arch == "encoder":
    if cfg.mlm_head_transform:
      head, head_mm = _dense(cfg, cfg.emb_dim, cfg.emb_dim)
      total, matmul = total + head + _norm(cfg), matmul + head_mm
    if cfg.use_bias:
      total += cfg.vocab_size
  return ModelSize(total_params=total, embedding_params=embedding, matmul_params=matmul)


def train_flops_per_sequence(cfg: ModelConfig, length: int, target_length: int | None = None) -> int:
  """Forward plus backward FLOPs for one sequence (PaLM's count).

  `length` is the decoder's or encoder's sequence length; an encoder-decoder also
  needs `target_length`, the decoder's.
  """
  attn_width = cfg.num_heads * cfg.dim_per_head
  size = model_size(cfg)
  if cfg.arch != "encoder_decoder":
    if target_length is not None:
      raise ValueError(f"target_length applies only to encoder_decoder, not model.arch={cfg.arch!r}")
    return 6 * size.matmul_params * length + 12 * cfg.num_layers * length * length * attn_width
  if target_length is None:
    raise ValueError("an encoder_decoder needs target_length (the decoder's sequence length)")
  _, _, encoder_mm = _stack(cfg, cfg.num_layers, cross_attention=False)
  # Cross-attention keys and values project the encoder's tokens, not the decoder's.
  cross_kv_mm = cfg.decoder_layers * 2 * cfg.emb_dim * cfg.kv_heads * cfg.dim_per_head
  decoder_mm = size.matmul_params - encoder_mm - cross_kv_mm
  flops = 6 * (encoder_mm + cross_kv_mm) * length + 6 * decoder_mm * target_length
  flops += 12 * cfg.num_layers * length * length * attn_width
  flops += 12 * cfg.decoder_layers * target_length * (target_length + length) * attn_width
  return flops


def train_flops_per_token(cfg: ModelConfig, length: int, target_length: int | None = None) -> float:
  """Training FLOPs per token processed (input plus target tokens for an encoder-decoder)."""
  tokens = length + (target_length or 0)
  return train_flops_per_sequence(cfg, length, target_length) / tokens
