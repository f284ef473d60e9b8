"""A deterministic in-memory loader with the real loader's interface, for trainer tests.

Rows repeat a short pattern per row so a tiny model can lower its loss in a few steps.
"""

import numpy as np


class PatternLoader:

  def __init__(self, data_config, split, *, process_index, process_count):
    self.config = data_config
    self.split = split
    self.process_index, self.process_count = process_index, process_count
    self.position = 0

  def get_state(self):
    return {"position": self.position, "process_index": self.process_index}

  def set_state(self, state):
    """Refuses another process's position, as the real loader does."""
    assert state["process_index"] == self.process_index, (state, self.process_index)
    self.position = int(state["position"])

  def __iter__(self):
    return self

  def _rows(self, index, length):
    rng = np.random.default_rng(1000 * (self.split == "validation") + index)
    starts = rng.integers(3, 30, size=self.config.batch_size)
    return self._local((starts[:, None] + np.arange(length + 1)[None, :]) % 61 + 3)

  def _local(self, rows):
    """This process's share of the global batch's rows."""
    local = self.config.batch_size // self.process_count
    return rows[self.process_index * local:(self.process_index + 1) * local]

  def __next__(self):
    cfg = self.config
    self.position += 1
    if cfg.get("input_len"):
      inputs = self._rows(self.position, cfg.input_len)[:, :-1]
      targets = self._rows(self.position + 7, cfg.target_len)
      encoder = {"encoder_input_tokens": inputs, "encoder_segment_ids": np.ones_like(inputs),
                 "encoder_positions": np.broadcast_to(np.arange(cfg.input_len), inputs.shape)}
      decoder = targets
    else:
      decoder = self._rows(self.position, cfg.seq_len)
      encoder = {}
    length = decoder.shape[1] - 1
    batch = {
        "decoder_input_tokens": decoder[:, :-1], "decoder_target_tokens": decoder[:, 1:],
        "decoder_loss_weights": np.ones((decoder.shape[0], length), np.float32),
        "decoder_segment_ids": np.ones((decoder.shape[0], length), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(length), (decoder.shape[0], length)),
        **encoder,
    }
    batch["encoder_target_tokens"] = batch["decoder_target_tokens"]
    if "encoder_input_tokens" not in batch:
      masked = batch["decoder_target_tokens"].copy()
      masked[:, ::4] = 2
      batch.update(encoder_input_tokens=masked, encoder_segment_ids=batch["decoder_segment_ids"],
                   encoder_positions=batch["decoder_positions"], encoder_loss_weights=(masked == 2).astype(np.float32))
    return batch


class RaggedPatternLoader(PatternLoader):
  """PatternLoader's decoder rows, each padded after its own length as packing leaves rows:
  loss weight and segment id 0 there. Shards and micro-batches then hold different numbers of
  scored tokens, which an average of per-shard means would get wrong."""

  def __next__(self):
    batch = super().__next__()
    length = batch["decoder_target_tokens"].shape[1]
    lengths = self._local(np.random.default_rng(500 + self.position).integers(2, length + 1, self.config.batch_size))
    real = np.arange(length)[None, :] < lengths[:, None]
    return dict(batch, decoder_loss_weights=real.astype(np.float32), decoder_segment_ids=real.astype(np.int32))


class CharacterTokenizer:
  """One id per character within the tiny configs' vocabulary (64), for evaluating PatternLoader runs:
  every id decodes to one byte, so bits per byte are the loss in bits per token."""

  TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 2
  byte_lengths = np.array([0, 0] + [1] * 62)  # pad and eos stand for no text

  def encode(self, text):
    return np.array([3 + ord(c) % 61 for c in text], np.int32)

  def decode(self, ids):
    return "x" * len(ids)
