"""The three architectures, read top to bottom: embeddings, a stack of blocks, a head.

- `EncoderMLM`: bidirectional encoder with a masked-LM head (BERT).
- `DecoderLM`: causal decoder (GPT, LLaMA), optionally a prefix LM whose prefix
  attends bidirectionally (Raffel et al. 2020, sec. 3.2.1).
- `EncoderDecoder`: encoder plus a causal decoder with cross-attention (T5).

Decoders support incremental decoding: `init_cache` allocates key/value buffers and
`decode` extends them by the given tokens (a whole prompt, then one token a step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention, attention_mask, heads_first
from models.config import ConfigError, ModelConfig
from models.layers import (Dense, Embed, Mlp, Norm, RelativePositionBias, activation, constrain,
                           param, sinusoidal_embedding)
from models.losses import chunked_cross_entropy_sums, cross_entropy_sums

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
# ModelConfig.remat: what jax.checkpoint may keep of a block for the backward pass. Our
# projections are 2-D matmuls and attention's products are batched, so "dots" keeps the
# former and recomputes the latter.
CHECKPOINT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# A decoder's T5 buckets are one-directional (distance max(query - key, 0)): a prefix that reads
# both ways would see every later prefix token at distance 0, its order lost. Mesh TensorFlow
# gives prefix LMs bidirectional buckets instead: model.relative_bidirectional.
PREFIX_LM_RELATIVE = ("a prefix LM (prefix_mask, data.objective='prefix_lm') with model.position='relative' needs "
                      "model.relative_bidirectional=True: a causal decoder's relative buckets are one-directional, "
                      "so a prefix token would see every later one at distance 0")


class Block(nnx.Module):
  """Self-attention, optional cross-attention, MLP; each a residual sublayer.

  Pre-norm: x + f(norm(x)) (GPT-2, LLaMA, T5). Post-norm: norm(x + f(x)) (BERT, the
  original Transformer).
  """

  def __init__(self, cfg: ModelConfig, *, cross_attention: bool, rngs: nnx.Rngs):
    self.pre_norm = cfg.norm_position == "pre"
    self.self_attention_norm = Norm(cfg.emb_dim, cfg, rngs=rngs)
    self.self_attention = Attention(cfg, rope=cfg.position == "rope", rngs=rngs)
    self.cross_attention_norm = Norm(cfg.emb_dim, cfg, rngs=rngs) if cross_attention else None
    self.cross_attention = Attention(cfg, rope=False, rngs=rngs) if cross_attention else None
    self.mlp_norm = Norm(cfg.emb_dim, cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def _residual(self, x, norm, sublayer):
    if self.pre_norm:
      out, aux = sublayer(norm(x))
      return x + self.dropout(out), aux
    out, aux = sublayer(x)
    return norm(x + self.dropout(out)), aux

  def __call__(self, x, *, mask, bias, positions, encoded=None, cross_mask=None,
               cache=None, cache_index=None, causal=False):
    cache = cache or {}
    x, self_cache = self._residual(x, self.self_attention_norm, lambda h: self.self_attention(
        h, mask=mask, bias=bias, positions=positions, cache=cache.get("self"), cache_index=cache_index,
        causal=causal))
    cross_cache = None
    if self.cross_attention is not None:
      x, cross_cache = self._residual(x, self.cross_attention_norm, lambda h: self.cross_attention(
          h, mask=cross_mask, kv_inputs=encoded, cache=cache.get("cross")))
    x, _ = self._residual(x, self.mlp_norm, lambda h: (self.mlp(h), None))
    x = constrain(x, BATCH_LENGTH_EMBED)
    new_cache = {"self": self_cache, "cross": cross_cache} if self_cache is not None else None
    return x, new_cache


class Stack(nnx.Module):
  """Token embeddings in, hidden states out: positions, masks, blocks, final norm."""

  def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross_attention: bool,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.causal = causal
    self.position_embed = nnx.data(None)
    if cfg.position == "learned":
      self.position_embed = Embed(cfg.max_len, cfg.emb_dim, (None, "embed"), cfg, rngs=rngs)
    self.relative_bias = nnx.data(None)
    if cfg.position == "relative":
      self.relative_bias = RelativePositionBias(cfg, bidirectional=not causal or cfg.relative_bidirectional,
                                                rngs=rngs)
    self.token_type_embed = nnx.data(None)
    if cfg.num_token_types and not cross_attention:
      self.token_type_embed = Embed(cfg.num_token_types, cfg.emb_dim, (None, "embed"), cfg, rngs=rngs)
    self.embedding_norm = Norm(cfg.emb_dim, cfg, rngs=rngs) if cfg.embedding_norm else None
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.layers = nnx.List([Block(cfg, cross_attention=cross_attention, rngs=rngs)
                            for _ in range(num_layers)])
    self.final_norm = Norm(cfg.emb_dim, cfg, rngs=rngs) if cfg.norm_position == "pre" else None

  def __call__(self, x, *, segment_ids, positions, token_type_ids=None, prefix_mask=None,
               encoded=None, encoded_segment_ids=None, cache=None):
    """x: token embeddings [b, t, d]; returns (hidden [b, t, d], updated cache or None)."""
    if prefix_mask is not None and self.relative_bias is not None and not self.relative_bias.bidirectional:
      raise ConfigError(PREFIX_LM_RELATIVE)
    if self.position_embed is not None:
      x = x + self.position_embed(positions)
    elif self.cfg.position == "sinusoidal":
      x = x + sinusoidal_embedding(positions, self.cfg.emb_dim).astype(x.dtype)
    if self.token_type_embed is not None:
      x = x + self.token_type_embed(jnp.zeros_like(segment_ids) if token_type_ids is None else token_type_ids)
    if self.embedding_norm is not None:
      x = self.embedding_norm(x)
    x = constrain(self.dropout(x), BATCH_LENGTH_EMBED)

    if cache is None:
      key_positions = positions
      mask = attention_mask(segment_ids, segment_ids, causal=self.causal,
                            query_prefix=prefix_mask, key_prefix=prefix_mask)
      cache_index = None
    else:
      cache_index = cache["index"]
      _check_cache_room(cache_index, x.shape[1], cache["segment_ids"].shape[1])
      write = lambda buffer, values: jax.lax.dynamic_update_slice_in_dim(buffer, values, cache_index, axis=1)
      prefix = jnp.zeros_like(segment_ids, dtype=bool) if prefix_mask is None else prefix_mask
      key_segments = write(cache["segment_ids"], segment_ids)
      key_positions = write(cache["positions"], positions)
      key_prefix = write(cache["prefix"], prefix)
      mask = attention_mask(segment_ids, key_segments, causal=True,
                            query_slots=cache_index + jnp.arange(x.shape[1]),
                            key_slots=jnp.arange(key_segments.shape[1]),
                            query_prefix=prefix, key_prefix=key_prefix)
      encoded_segment_ids = cache.get("encoded_segment_ids")
    bias = None
    if self.relative_bias is not None:
      bias = self.relative_bias(positions, key_positions)
    cross_mask = None
    if encoded_segment_ids is not None:
      cross_mask = attention_mask(segment_ids, encoded_segment_ids, causal=False)

    purely_causal = self.causal and prefix_mask is None and cache is None
    if cache is None:
      block = lambda layer, x: layer(x, mask=mask, bias=bias, positions=positions, encoded=encoded,
                                     cross_mask=cross_mask, causal=purely_causal)[0]
      if self.cfg.remat != "none":
        block = nnx.remat(block, policy=CHECKPOINT_POLICIES[self.cfg.remat])
      for layer in self.layers:
        x = block(layer, x)
    else:
      new_layers = []
      for i, layer in enumerate(self.layers):
        x, layer_cache = layer(x, mask=mask, bias=bias, positions=positions, encoded=encoded,
                               cross_mask=cross_mask, cache=cache["layers"][i], cache_index=cache_index)
        new_layers.append(layer_cache)
    if self.final_norm is not None:
      x = self.final_norm(x)
    if self.cfg.final_dropout:
      x = self.dropout(x)
    if cache is None:
      return x, None
    new_cache = dict(cache, index=cache_index + x.shape[1], segment_ids=key_segments,
                     positions=key_positions, prefix=key_prefix, layers=new_layers)
    return x, new_cache

  def init_cache(self, batch_size: int, max_len: int, encoded=None, encoded_segment_ids=None,
                 dtype=None) -> dict:
    """Empty key/value buffers; cross-attention keys are projected here, once.

    Keys and values are kept heads-first, [b, k, s, e], the layout attention's products
    read: in [b, s, k, e] XLA:CPU copied the whole cache twice per layer for every decoded
    token (docs/performance.md, item 44). For the same reason a CPU keeps them in float32
    unless `dtype` says otherwise: XLA:CPU runs batched bfloat16 products in float32,
    converting the whole cache first; a float32 cache holds the same bf16-rounded keys and
    is read as it is. Elsewhere the cache takes the compute dtype.
    """
    cfg = self.cfg
    shape = (batch_size, cfg.kv_heads, max_len, cfg.dim_per_head)
    if dtype is None:
      dtype = jnp.float32 if jax.default_backend() == "cpu" else cfg.compute_dtype
    layers = []
    for layer in self.layers:
      entry = {"self": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}, "cross": None}
      if layer.cross_attention is not None:
        k, v = layer.cross_attention.project_kv(encoded, None)
        entry["cross"] = {"k": heads_first(k).astype(dtype), "v": heads_first(v).astype(dtype)}
      layers.append(entry)
    cache = {"index": jnp.zeros((), jnp.int32),
             "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
             "positions": jnp.zeros((batch_size, max_len), jnp.int32),
             "prefix": jnp.zeros((batch_size, max_len), bool),
             "layers": layers}
    if encoded_segment_ids is not None:
      cache["encoded_segment_ids"] = encoded_segment_ids
    return cache


def _check_cache_room(index, new_tokens: int, max_len: int) -> None:
  """Refuses a write past the cache's end, which dynamic_update_slice would move back onto the last
  slots, to be attended as if in place. Checked where the index is known (decoding step by step
  outside jit); t5x_like.decoding's loops size their caches for every token they write."""
  if new_tokens > max_len or (not isinstance(index, jax.core.Tracer) and int(index) + new_tokens > max_len):
    at = "" if isinstance(index, jax.core.Tracer) else f" from slot {int(index)}"
    raise ValueError(f"decoding {new_tokens} tokens{at} overruns a cache of {max_len} slots; "
                     f"make init_cache's max_len larger")


def _defaults(tokens, segment_ids, positions, offset=0):
  """Unpacked, unpadded rows unless told otherwise: one segment, positions from offset."""
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(offset + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return segment_ids, positions


class _LanguageModel(nnx.Module):
  """Shared by the three models: the token table, the vocabulary projection and its loss."""

  def _init_embeddings(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.token_embed = Embed(cfg.vocab_size, cfg.emb_dim, ("vocab", "embed"), cfg, rngs=rngs)
    self.lm_head = nnx.data(None)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), cfg, use_bias=False, rngs=rngs)
    self.output_bias = nnx.data(None)

  def _logits(self, hidden: jax.Array) -> jax.Array:
    """[b, t, d] -> float32 logits [b, t, v]."""
    if self.lm_head is None:
      logits = self.token_embed.attend(hidden)
    else:
      logits = self.lm_head(hidden, out_dtype=jnp.float32)
    if self.output_bias is not None:
      logits = logits + self.output_bias[...].astype(jnp.float32)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

  def loss_sums(self, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Cross-entropy sums (models.losses) of the logits of `hidden` [b, t, d] against targets [b, t]."""
    cfg = self.config
    chunked = cfg.loss_kernel == "chunked" or (cfg.loss_kernel == "auto" and jax.default_backend() == "cpu")
    if not chunked:
      return cross_entropy_sums(self._logits(hidden), targets, weights, z_loss)
    if self.lm_head is None:
      table, table_in_dim = self.token_embed.embedding[...], 1
    else:
      table, table_in_dim = self.lm_head.kernel[...], 0
    bias = None if self.output_bias is None else self.output_bias[...].astype(jnp.float32)
    return chunked_cross_entropy_sums(hidden.astype(cfg.compute_dtype), table.astype(cfg.compute_dtype),
                                      targets, weights, z_loss, table_in_dim=table_in_dim, bias=bias,
                                      bf16_inputs=cfg.bf16_matmul_inputs)


class DecoderLM(_LanguageModel):
  """Causal language model (GPT-2, LLaMA); a prefix LM when given a prefix mask."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self._init_embeddings(cfg, rngs)
    self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross_attention=False, rngs=rngs)

  def __call__(self, tokens, *, segment_ids=None, positions=None, prefix_mask=None,
               token_type_ids=None) -> jax.Array:
    """tokens [b, t] -> logits [b, t, v]; prefix_mask [b, t] marks bidirectional inputs."""
    return self._logits(self.hidden(tokens, segment_ids=segment_ids, positions=positions,
                                    prefix_mask=prefix_mask, token_type_ids=token_type_ids))

  def hidden(self, tokens, *, segment_ids=None, positions=None, prefix_mask=None,
             token_type_ids=None) -> jax.Array:
    """tokens [b, t] -> the final hidden states [b, t, d] that the logits project."""
    segment_ids, positions = _defaults(tokens, segment_ids, positions)
    hidden, _ = self.decoder(self.token_embed(tokens), segment_ids=segment_ids, positions=positions,
                             prefix_mask=prefix_mask, token_type_ids=token_type_ids)
    return hidden

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
    return self.decoder.init_cache(batch_size, max_len, dtype=dtype)

  def decode(self, tokens, cache, *, segment_ids=None, positions=None, prefix_mask=None, last_only=False):
    """Extends the cache by tokens [b, t]; returns (logits [b, t, v], cache), or only the last
    token's logits [b, 1, v] with last_only (all a prompt's prefill needs: XLA computed every
    position's and sliced). A prefix LM's prefix_mask [b, t] goes with the whole prefix in the
    first call: tokens already cached never see prefix keys that a later call adds."""
    segment_ids, positions = _defaults(tokens, segment_ids, positions, offset=cache["index"])
    hidden, cache = self.decoder(self.token_embed(tokens), segment_ids=segment_ids,
                                 positions=positions, prefix_mask=prefix_mask, cache=cache)
    return self._logits(hidden[:, -1:] if last_only else hidden), cache


class EncoderMLM(_LanguageModel):
  """Bidirectional encoder with BERT's masked-LM head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self._init_embeddings(cfg, rngs)
    self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)
    self.mlm_dense = nnx.data(None)
    if cfg.mlm_head_transform:
      self.mlm_act = activation(cfg.mlp_activation)
      self.mlm_dense = Dense(cfg.emb_dim, cfg.emb_dim, ("embed", "mlp"), cfg, use_bias=cfg.use_bias, rngs=rngs)
      self.mlm_norm = Norm(cfg.emb_dim, cfg, rngs=rngs)
    if cfg.use_bias:
      self.output_bias = param(nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",), cfg, rngs)

  def encode(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None) -> jax.Array:
    """tokens [b, t] -> hidden states [b, t, d] (for heads other than masked LM)."""
    segment_ids, positions = _defaults(tokens, segment_ids, positions)
    hidden, _ = self.encoder(self.token_embed(tokens), segment_ids=segment_ids, positions=positions,
                             token_type_ids=token_type_ids)
    return hidden

  def __call__(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None) -> jax.Array:
    """tokens [b, t] -> masked-LM logits [b, t, v]."""
    return self._logits(self.hidden(tokens, segment_ids=segment_ids, positions=positions,
                                    token_type_ids=token_type_ids))

  def hidden(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None) -> jax.Array:
    """tokens [b, t] -> the masked-LM head's hidden states [b, t, d] that the logits project."""
    hidden = self.encode(tokens, segment_ids=segment_ids, positions=positions,
                         token_type_ids=token_type_ids)
    if self.mlm_dense is not None:
      hidden = self.mlm_norm(self.mlm_act(self.mlm_dense(hidden)))
    return hidden


class EncoderDecoder(_LanguageModel):
  """T5: an encoder and a causal decoder with cross-attention, sharing one token table."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self._init_embeddings(cfg, rngs)
    self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)
    self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross_attention=True, rngs=rngs)

  def encode(self, tokens, *, segment_ids=None, positions=None) -> jax.Array:
    segment_ids, positions = _defaults(tokens, segment_ids, positions)
    encoded, _ = self.encoder(self.token_embed(tokens), segment_ids=segment_ids, positions=positions)
    return encoded

  def __call__(self, encoder_tokens, decoder_tokens, *, encoder_segment_ids=None,
               encoder_positions=None, decoder_segment_ids=None, decoder_positions=None) -> jax.Array:
    """Teacher-forced logits [b, t, v] for decoder_tokens (the targets shifted right)."""
    return self._logits(self.hidden(encoder_tokens, decoder_tokens, encoder_segment_ids=encoder_segment_ids,
                                    encoder_positions=encoder_positions, decoder_segment_ids=decoder_segment_ids,
                                    decoder_positions=decoder_positions))

  def hidden(self, encoder_tokens, decoder_tokens, *, encoder_segment_ids=None,
             encoder_positions=None, decoder_segment_ids=None, decoder_positions=None) -> jax.Array:
    """The decoder's final hidden states [b, t, d] that the logits project."""
    encoder_segment_ids, encoder_positions = _defaults(encoder_tokens, encoder_segment_ids, encoder_positions)
    encoded = self.encode(encoder_tokens, segment_ids=encoder_segment_ids, positions=encoder_positions)
    decoder_segment_ids, decoder_positions = _defaults(decoder_tokens, decoder_segment_ids, decoder_positions)
    hidden, _ = self.decoder(self.token_embed(decoder_tokens), segment_ids=decoder_segment_ids,
                             positions=decoder_positions, encoded=encoded,
                             encoded_segment_ids=encoder_segment_ids)
    return hidden

  def init_cache(self, encoded, max_len: int, encoded_segment_ids=None, dtype=None) -> dict:
    """Decoder cache for `encoded` [b, s, d]; cross-attention keys computed here, once."""
    if encoded_segment_ids is None:
      encoded_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
    return self.decoder.init_cache(encoded.shape[0], max_len, encoded, encoded_segment_ids, dtype=dtype)

  def decode(self, tokens, cache, *, segment_ids=None, positions=None, last_only=False):
    """Extends the decoder cache by tokens [b, t]; returns (logits [b, t, v], cache), [b, 1, v]
    with last_only (DecoderLM.decode)."""
    segment_ids, positions = _defaults(tokens, segment_ids, positions, offset=cache["index"])
    hidden, cache = self.decoder(self.token_embed(tokens), segment_ids=segment_ids,
                                 positions=positions, cache=cache)
    return self._logits(hidden[:, -1:] if last_only else hidden), cache


MODELS = {"encoder": EncoderMLM, "decoder": DecoderLM, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig, *, seed: int = 0, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Initialises the model the config's `arch` names: parameters drawn from `seed`, dropout from
  `seed + 1`, unless `rngs` holds the streams (the trainer's, keyed by traced data)."""
  return MODELS[cfg.arch](cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1) if rngs is None else rngs)
