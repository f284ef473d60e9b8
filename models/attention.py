"""Attention: masks from segment ids, grouped-query dot-product attention, KV caching.

One mask rule serves packing, padding, causality and prefix LM: query i may see key j
when both are real tokens of the same segment (segment id 0 is padding) and, in a
causal stack, j comes no later than i, or both lie in the bidirectional prefix.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.blocked_attention import MASKED_LOGIT, QUERY_BLOCK, blocked_attention
from models.config import ModelConfig
from models.layers import Dense, apply_rope, constrain, row_sum


def attention_mask(query_segments: jax.Array, key_segments: jax.Array, *,
                   causal: bool, query_slots: jax.Array | None = None,
                   key_slots: jax.Array | None = None, query_prefix: jax.Array | None = None,
                   key_prefix: jax.Array | None = None) -> jax.Array:
  """Boolean mask [b, 1, t, s]: True where query t may attend to key s.

  Slots are the sequence (or KV-cache) indices that define causal order; they are not
  positions, which restart per packed document.
  """
  mask = (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] != 0)
  if causal:
    query_slots = jnp.arange(query_segments.shape[1]) if query_slots is None else query_slots
    key_slots = jnp.arange(key_segments.shape[1]) if key_slots is None else key_slots
    visible = key_slots[None, None, :] <= query_slots[..., :, None]
    if query_prefix is not None:
      visible = visible | (query_prefix[:, :, None] & key_prefix[:, None, :])
    mask = mask & visible
  return mask[:, None, :, :]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                          bias: jax.Array | None, *, scale: float, kernel: str = "xla",
                          causal: bool = False, dropout: Callable | None = None) -> jax.Array:
  """Softmax(q k^T * scale + bias) v with logits and softmax in float32.

  query [b, t, h, e]; key, value [b, s, k, e] with h a multiple of k (GQA: each kv head
  serves g = h / k query heads, MQA when k = 1); mask [b, 1, t, s]; bias [b|1, h, t, s].
  kernel "xla" materialises all scores at once; "blocked" (models/blocked_attention.py)
  loops over cache-sized blocks; "cudnn" is cuDNN's flash attention on GPUs (`fused_attention`).
  Neither of the last two takes a bias or a dropout of the probabilities. `causal` promises
  the mask is purely causal, which lets both skip hidden keys.
  """
  b, t, h, e = query.shape
  kv_heads = key.shape[2]
  if kernel != "xla" and dropout is not None:
    raise ValueError(f"the {kernel} attention kernel forms no probabilities to drop; use kernel='xla'")
  if kernel == "cudnn":
    if bias is not None:
      raise ValueError("the cudnn attention kernel takes no bias here; use kernel='xla'")
    return fused_attention(query, key, value, mask, scale=scale, causal=causal)
  if kernel == "blocked":
    if bias is not None:
      raise ValueError("the blocked attention kernel takes no bias; use kernel='xla'")
    query = query.reshape(b, t, kv_heads, h // kv_heads, e)
    out = blocked_attention(query, key, value, mask, scale, causal)
    return out.reshape(b, t, h, e).astype(value.dtype)
  return heads_first_attention(query, heads_first(key), heads_first(value), mask, bias, scale=scale,
                               dropout=dropout)


def heads_first_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                          bias: jax.Array | None, *, scale: float, rows: jax.Array | None = None,
                          dropout: Callable | None = None) -> jax.Array:
  """dot_product_attention's xla kernel for key, value [b, k, s, e], the KV cache's layout.

  Heads-first layouts make both products plain batched matmuls over (b, k); mixing batch
  and head dims inside the einsums costs XLA:CPU twice the time in transposes.

  rows [b, s], beam search's cache index: slot s of row r is read from row rows[r, s] of key
  and value. Beam search leaves each beam's keys in the row that wrote them rather than
  gathering the whole cache for the surviving beams every step (t5x_like.decoding). The
  products are then broadcast multiplies and sums, which XLA fuses with the lookup, so each
  key is read once; the sum over e goes through row_sum, since XLA:CPU's tree reduction would
  write the whole product out first (docs/performance.md, item 46).
  """
  b, t, h, e = query.shape
  kv_heads = key.shape[1]
  query = query.reshape(b, t, kv_heads, h // kv_heads, e).transpose(0, 2, 3, 1, 4)  # [b, k, g, t, e]
  if rows is None:
    logits = attention_product("bkgte,bkse->bkgts", query, key)
  else:
    where = (rows[:, None, :], jnp.arange(kv_heads)[None, :, None], jnp.arange(key.shape[2])[None, None, :])
    key, value = (x[where].astype(jnp.float32)[:, :, None, None] for x in (key, value))  # [b, k, 1, 1, s, e]
    logits = row_sum(query.astype(jnp.float32)[..., None, :] * key)
  logits = logits * scale
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], kv_heads, h // kv_heads, t, -1)
  logits = jnp.where(mask[:, :, None], logits, MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)  # as a bf16 cache would, if it is float32
  if dropout is not None:
    weights = dropout(weights)
  if rows is None:
    out = attention_product("bkgts,bkse->bkgte", weights, value)
  else:
    out = jnp.sum(weights.astype(jnp.float32)[..., None] * value, axis=-2)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e).astype(query.dtype)


def heads_first(keys: jax.Array) -> jax.Array:
  """[b, s, k, e] keys or values -> [b, k, s, e], the layout of KV caches."""
  return keys.transpose(0, 2, 1, 3)


def attention_product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) accumulated in float32.

  For bfloat16 operands off the CPU its backward products take the output gradient rounded
  to bfloat16, as flash attention's do: autodiff's float32 gradient would run both in float32,
  TF32 on GPUs (docs/performance.md, item 37). XLA:CPU keeps autodiff's, tuned in item 19.
  """
  if a.dtype == jnp.bfloat16 and jax.default_backend() != "cpu":
    return _bf16_gradient_product(spec, a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_gradient_product(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _bf16_gradient_product_forward(spec, a, b):
  return _bf16_gradient_product(spec, a, b), (a, b)


def _bf16_gradient_product_backward(spec, operands, d_out):
  _, pullback = jax.vjp(functools.partial(jnp.einsum, spec), *operands)  # bf16 in, bf16 out
  return pullback(d_out.astype(jnp.bfloat16))


_bf16_gradient_product.defvjp(_bf16_gradient_product_forward, _bf16_gradient_product_backward)


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, *,
                    scale: float, causal: bool, implementation: str = "cudnn") -> jax.Array:
  """jax.nn.dot_product_attention in our layouts; "cudnn" is cuDNN's flash attention.

  Our [b, t, h, e] is jax's BTNH, and jax groups query heads per kv head as we do. cuDNN
  takes bf16/fp16 operands (ModelConfig.validate checks), turns the boolean mask into an
  additive bias and, with `causal`, skips the hidden blocks too. CI has no GPU, so the
  tests run this with implementation="xla": the same call, jax's reference kernel.
  """
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"model.attention_kernel='cudnn' runs on NVIDIA GPUs only, and this backend "
                     f"is {jax.default_backend()!r}; use attention_kernel='auto'")
  return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=causal,
                                      implementation=implementation)


def _cudnn_takes(head_dim: int, keys: int, queries: int) -> bool:
  """The limits of jax's cuDNN flash attention past ModelConfig.cudnn_misfit's, which "auto" steers
  around (check_is_flash_attention in jax/_src/cudnn/fused_attention_stablehlo.py): a head dim past
  128 before Hopper, and odd lengths, which it refuses when training with a mask (ours always is)."""
  hopper = float(getattr(jax.devices()[0], "compute_capability", "9.0")) >= 9.0
  return (head_dim <= 128 or hopper) and keys % 2 == 0 and queries % 2 == 0


class Attention(nnx.Module):
  """Multi-head self- or cross-attention with separate q/k/v projections (MHA/MQA/GQA)."""

  def __init__(self, cfg: ModelConfig, *, rope: bool, rngs: nnx.Rngs):
    heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    self.rope_theta = cfg.rope_theta if rope else None
    self.scale = head_dim ** -0.5 if cfg.scale_attn_logits else 1.0
    self.kernel = cfg.attention_kernel
    self.cudnn_fits = cfg.cudnn_misfit is None
    self.head_dim = head_dim
    bias = cfg.use_bias
    # Unscaled logits (T5) start at unit scale all the same: T5 draws its query kernel with
    # variance 1 / (emb_dim * head_dim) instead of 1 / emb_dim.
    self.query = Dense(cfg.emb_dim, (heads, head_dim), ("embed", "heads", "kv"), cfg, use_bias=bias, rngs=rngs,
                       init_scale=1.0 if cfg.scale_attn_logits else 1.0 / head_dim)
    self.key = Dense(cfg.emb_dim, (kv_heads, head_dim), ("embed", "kv_heads", "kv"), cfg, use_bias=bias, rngs=rngs)
    self.value = Dense(cfg.emb_dim, (kv_heads, head_dim), ("embed", "kv_heads", "kv"), cfg, use_bias=bias, rngs=rngs)
    self.out = Dense((heads, head_dim), cfg.emb_dim, ("heads", "kv", "embed"), cfg, use_bias=bias, rngs=rngs)
    self.dropout = nnx.data(None)  # on the probabilities; the xla kernel applies it
    if cfg.attention_dropout_rate:
      self.dropout = nnx.Dropout(cfg.attention_dropout_rate, rngs=rngs)

  def project_kv(self, x: jax.Array, positions: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Keys and values [b, s, k, e] for inputs x [b, s, d]; rotated when using RoPE."""
    key, value = self.key(x), self.value(x)
    if self.rope_theta is not None:
      key = apply_rope(key, positions, self.rope_theta)
    return key, value

  def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array | None = None,
               positions: jax.Array | None = None, kv_inputs: jax.Array | None = None, cache: dict | None = None,
               cache_index: jax.Array | None = None, causal: bool = False) -> tuple[jax.Array, dict | None]:
    """Attends from x [b, t, d]; returns ([b, t, d], updated cache).

    Self-attention uses x for keys too; cross-attention passes kv_inputs, or a cache
    whose `k`/`v` were computed once from the encoder output. Caches hold [b, k, s, e]
    (`heads_first`). For cached self-attention, this call's keys are written at
    cache_index and the whole cache is attended (the mask says which slots are valid),
    through the cache's `rows` index if it has one (`heads_first_attention`).
    `causal` promises a purely causal mask (no prefix, no cache), which the blocked and cuDNN
    kernels use (`dot_product_attention`).
    """
    query = self.query(x)  # [b, t, h, e]
    if self.rope_theta is not None:
      query = apply_rope(query, positions, self.rope_theta)
    query = constrain(query, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    if cache is not None and cache_index is None:  # cross-attention keys, computed once
      key, value = cache["k"], cache["v"]
    else:
      # Cross-attention keys are never rotated (rope=False), so they need no positions.
      key, value = self.project_kv(x, positions) if kv_inputs is None else self.project_kv(kv_inputs, None)
      if cache is not None:
        write = lambda buffer, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            buffer, heads_first(new).astype(buffer.dtype), cache_index, axis=2)
        cache = dict(cache, k=write(cache["k"], key), v=write(cache["v"], value))
        key, value = cache["k"], cache["v"]
    if cache is not None:  # always the xla kernel, on the cache's heads-first layout
      out = heads_first_attention(query, key, value, mask, bias, scale=self.scale, rows=cache.get("rows"))
    else:
      out = dot_product_attention(query, key, value, mask, bias, scale=self.scale,
                                  kernel=self._kernel(bias, key.shape[1], query.shape[1]), causal=causal,
                                  dropout=self._dropout)
    return self.out(out), cache

  @property
  def _dropout(self):
    """The probabilities' dropout while training with it, else None."""
    return None if self.dropout is None or self.dropout.deterministic else self.dropout

  def _kernel(self, bias: jax.Array | None, keys: int, queries: int) -> str:
    if bias is not None or self._dropout is not None:
      return "xla"
    if self.kernel == "auto":
      # cuDNN: 1.38x the xla kernel's 1b step on an H200 (docs/performance.md, item 39).
      if jax.default_backend() == "gpu" and self.cudnn_fits and _cudnn_takes(self.head_dim, keys, queries):
        return "cudnn"
      # Short attention fits in cache anyway; on a multi-device mesh the pair loop would
      # gather the batch onto every device.
      one_device = jax.sharding.get_abstract_mesh().size <= 1
      return "blocked" if jax.default_backend() == "cpu" and one_device and keys > QUERY_BLOCK else "xla"
    return self.kernel
