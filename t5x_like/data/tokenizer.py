"""SentencePiece tokenizers with T5's fixed special ids, and `t5x-like tokenizer train`.

Id layout of a vocabulary of V ids, the same for every model:

  0 pad, 1 eos, 2 unk            T5's convention (Raffel et al. 2020); pad doubles as the
                                 decoder's start token
  3 .. V-102                     the SentencePiece pieces, the 256 byte-fallback pieces among them
  V-101 = mask_id                BERT's [MASK] for masked LM (Devlin et al. 2019)
  V-100 .. V-1                   the 100 span-corruption sentinels, sentinel i = V-1-i
                                 (T5's <extra_id_i>)

Like T5's extra ids, the mask and the sentinels are appended to the SentencePiece model's
pieces: a model file of P pieces, pad, eos and unk among them, gives V = P + 101 (one more for
each of the three it lacks, whose id stays reserved). A model trained elsewhere with other
special ids (e.g. unk=0, bos=1, eos=2) is remapped to this layout on load.

Training keeps an exact round trip, decode(encode(text)) == text: identity normalization,
no whitespace cleanup, no dummy prefix (so encode(a) + encode(b) decodes to a + b, which
prompt/response pairs rely on) and byte fallback for characters outside the vocabulary. One
exception: U+2581 ("▁"), SentencePiece's own mark for a space, decodes as a space.

The shipped tokenizer was trained, in under a second on 2 cores, with
  t5x-like tokenizer train --input t5x_like/data/corpora/austen/*.txt --vocab-size 8192 \
      --output t5x_like/data/tokenizers/austen_bpe_8k --overwrite
(the `t5x-like` command's subcommand); retraining reproduces it byte for byte.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import pathlib
import re
from typing import Iterator, Sequence

import numpy as np
import sentencepiece as spm

from models.config import ConfigError
from t5x_like.config import nonempty_path
from t5x_like.data import documents
from t5x_like.data.documents import DataError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
FIRST_PIECE_ID = 3
NUM_SENTINELS = 100
BYTE_PIECES = 256
MAX_SENTENCE_BYTES = 1 << 16  # SentencePiece's max_sentence_length; train_tokenizer cuts longer texts
SPECIAL_NAME = re.compile(r"<extra_id_(\d+)>|<mask>")
SHIPPED = {"austen_bpe_8k": pathlib.Path(__file__).parent / "tokenizers" / "austen_bpe_8k.model"}


class Tokenizer:
  """A SentencePiece model in the fixed id layout; encode/decode work on numpy int32 ids."""

  def __init__(self, model_file: str | pathlib.Path):
    self.model_file = pathlib.Path(model_file)
    if not self.model_file.is_file():
      raise DataError(f"tokenizer {self.model_file}: no such file")
    model = self.model_file.read_bytes()
    # The digest of the bytes loaded, not of the file later: which ids a checkpoint was trained with.
    self.sha256 = hashlib.sha256(model).hexdigest()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model)
    except (OSError, RuntimeError) as error:
      raise DataError(f"tokenizer {self.model_file} is not a SentencePiece model ({error})") from None
    pieces = self._sp.get_piece_size()
    specials = {PAD_ID: self._sp.pad_id(), EOS_ID: self._sp.eos_id(), UNK_ID: self._sp.unk_id()}
    ordinary = [i for i in range(pieces) if i not in specials.values()]
    self._to_id = np.empty(pieces, np.int32)  # SentencePiece id -> our id
    for ours, theirs in specials.items():
      if theirs >= 0:
        self._to_id[theirs] = ours
    self._to_id[ordinary] = FIRST_PIECE_ID + np.arange(len(ordinary))
    self.mask_id = FIRST_PIECE_ID + len(ordinary)
    self.vocab_size = self.mask_id + 1 + NUM_SENTINELS
    self._to_piece = np.full(self.mask_id, -1, np.int64)  # our id -> SentencePiece id (-1: none)
    self._to_piece[self._to_id] = np.arange(pieces)

  @functools.cached_property
  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes of each id's piece [vocab_size]: a byte-fallback piece is one byte, so a text's
    bytes are its tokens' sum even where a cut splits a character; pad, eos, the mask and the
    sentinels stand for none, unk (with byte fallback, never made) for one. A model trained
    elsewhere with a dummy prefix counts the space it adds before each text."""
    lengths = np.zeros(self.vocab_size, np.int64)
    for ours in range(FIRST_PIECE_ID, self.mask_id):
      piece = int(self._to_piece[ours])
      if self._sp.is_byte(piece):
        lengths[ours] = 1
      elif not self._sp.is_control(piece):
        lengths[ours] = len(self._sp.id_to_piece(piece).replace("\u2581", " ").encode("utf-8"))
    lengths[UNK_ID] = 1
    return lengths

  def sentinel_id(self, index: int) -> int:
    """T5's <extra_id_{index}>: the last id is sentinel 0."""
    if not 0 <= index < NUM_SENTINELS:
      raise ValueError(f"sentinel {index} out of range: there are {NUM_SENTINELS}")
    return self.vocab_size - 1 - index

  def encode(self, text: str) -> np.ndarray:
    """Ids [n] (int32) of the text, without eos."""
    return self._to_id[np.asarray(self._sp.encode(text), np.int64)]

  def encode_marked(self, text: str) -> np.ndarray:
    """encode, where `<mask>` and `<extra_id_N>` written in the text stand for those ids (the
    names decode writes): a prompt marks the spans a span-corruption model fills."""
    ids, start = [], 0
    for match in SPECIAL_NAME.finditer(text):
      index = match.group(1)
      if index is not None and int(index) >= NUM_SENTINELS:
        raise DataError(f"{match.group(0)} in {text!r} names no sentinel: there are {NUM_SENTINELS}")
      ids += [self.encode(text[start:match.start()]),
              [self.mask_id if index is None else self.sentinel_id(int(index))]]
      start = match.end()
    return np.concatenate(ids + [self.encode(text[start:])]).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text up to the first eos; pads are skipped, the mask and sentinels shown by name."""
    text, run = [], []
    for token in np.asarray(ids, np.int64).reshape(-1).tolist():
      if not 0 <= token < self.vocab_size:
        raise ValueError(f"id {token} is outside the {self.vocab_size} ids of tokenizer {self.model_file}")
      if token == EOS_ID:
        break
      if token == PAD_ID:
        continue
      if token < self.mask_id:
        run.append(int(self._to_piece[token]))
        continue
      text.append(self._sp.decode(run))
      run = []
      text.append("<mask>" if token == self.mask_id else f"<extra_id_{self.vocab_size - 1 - token}>")
    text.append(self._sp.decode(run))
    return "".join(text)


def tokenizer_path(spec: str) -> pathlib.Path | None:
  """The model file a `data.tokenizer` value names (a shipped name or a path), or None."""
  if spec in SHIPPED:
    return SHIPPED[spec]
  path = pathlib.Path(spec).expanduser()
  return path if path.is_file() else None


def absolute_tokenizer(spec: str) -> str:
  """data.tokenizer with a path made absolute (a shipped name stays), as absolute_dataset."""
  return spec if spec in SHIPPED else os.path.abspath(os.path.expanduser(spec))


def load_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer a spec names. Config checks, loaders and the CLI all ask for it, so a
  file is read once per process until it changes on disk."""
  path = tokenizer_path(spec)
  if path is None:
    raise DataError(f"tokenizer {spec!r} is neither a shipped tokenizer ({', '.join(SHIPPED)}) "
                    "nor an existing .model file")
  return _read_tokenizer(path.resolve(), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_tokenizer(path: pathlib.Path, mtime_ns: int) -> Tokenizer:
  del mtime_ns  # part of the cache key only
  return Tokenizer(path)


def min_vocab_size() -> int:
  """Ids the layout reserves (pad, eos, unk, byte pieces, mask, sentinels) plus one piece."""
  return FIRST_PIECE_ID + BYTE_PIECES + 1 + NUM_SENTINELS + 1


def train_tokenizer(inputs: Sequence[str | pathlib.Path], vocab_size: int,
                    output_prefix: str | pathlib.Path, model_type: str = "bpe", *,
                    overwrite: bool = False) -> pathlib.Path:
  """Trains on the files' documents (see documents.py) and writes `{output_prefix}.model`.

  `vocab_size` counts every id, the mask and the sentinels included, so a model trained
  with --vocab-size 8192 fits a model config with vocab_size=8192. An existing model is
  replaced only with `overwrite`: runs trained with it would read other ids.
  """
  if vocab_size < min_vocab_size():
    raise ConfigError(
        f"--vocab-size {vocab_size} is too small: the special ids need {min_vocab_size() - 1} "
        f"(pad, eos, unk, {BYTE_PIECES} byte-fallback pieces, the mask and {NUM_SENTINELS} "
        f"sentinels) plus at least one piece; use --vocab-size {min_vocab_size()} or more")
  if model_type not in ("bpe", "unigram"):
    raise ConfigError(f"--model-type {model_type!r} is not one of bpe, unigram")
  if not inputs:
    raise ConfigError("--input names no files")
  path = _output_path(output_prefix, overwrite)
  texts = [piece for file in inputs for text in documents.texts(file) for piece in _training_pieces(text)]
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type=model_type,
        vocab_size=vocab_size - 1 - NUM_SENTINELS, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        bos_id=-1, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        max_sentence_length=MAX_SENTENCE_BYTES, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as error:
    raise DataError(f"SentencePiece could not train {vocab_size} ids on {len(inputs)} file(s) "
                    f"({', '.join(map(str, inputs[:3]))}{', ...' if len(inputs) > 3 else ''}): "
                    f"{_in_vocab_size_units(str(error))}") from None
  path.write_bytes(model.getvalue())
  return path


def _in_vocab_size_units(error: str) -> str:
  """SentencePiece's complaint about its piece count, with its bounds in --vocab-size's units,
  which count the mask and sentinels too (its "<= 308" meant --vocab-size 409)."""
  reserved = 1 + NUM_SENTINELS
  if match := re.search(r"required_chars\. (\d+) vs (\d+)", error):  # fewer pieces than the text's characters
    return (f"the text's characters and the byte and special pieces take {match[2]} pieces; use --vocab-size "
            f"{int(match[2]) + reserved} or more")
  if match := re.search(r"set it to a value <= (\d+)", error):  # more pieces than the text can make
    return (f"the text makes at most {match[1]} pieces; use --vocab-size {int(match[1]) + reserved} or less, "
            f"or more text")
  return f"{error}; use another --vocab-size or more text"


def _training_pieces(text: str) -> Iterator[str]:
  """text cut at spaces into pieces of at most MAX_SENTENCE_BYTES // 4 characters (so at most
  MAX_SENTENCE_BYTES bytes): SentencePiece leaves a longer text out of training, silently."""
  limit = MAX_SENTENCE_BYTES // 4
  start = 0
  while len(text) - start > limit:
    cut = text.rfind(" ", start + 1, start + limit)
    end = cut if cut > start else start + limit  # a single word that long is cut where it must be
    yield text[start:end]
    start = end
  yield text[start:]


def _output_path(output_prefix: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
  """PREFIX.model (PREFIX.model itself if given so), checked before the training it would follow."""
  prefix = str(output_prefix)
  if prefix.endswith(os.sep) or pathlib.Path(prefix).is_dir():
    raise ConfigError(f"--output {prefix} is a directory; give a prefix, e.g. {os.path.join(prefix, 'name')}")
  path = pathlib.Path(prefix if prefix.endswith(".model") else f"{prefix}.model")
  if path.is_dir():
    raise ConfigError(f"{path} is a directory; give another --output")
  if path.exists() and not overwrite:
    raise ConfigError(f"{path} exists; --overwrite replaces it (runs trained with it would then read other ids)")
  if path.exists() and not os.access(path, os.W_OK):
    raise ConfigError(f"{path} is not writable")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"--output {prefix}: cannot make {path.parent} ({error})") from None
  if not os.access(path.parent, os.W_OK):
    raise ConfigError(f"--output {prefix}: {path.parent} is not writable")
  return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `tokenizer` command's subcommands, for registering under a larger CLI."""
  commands = parser.add_subparsers(dest="tokenizer_command", required=True)
  train = commands.add_parser("train", help="train a SentencePiece tokenizer on text or JSONL files",
                              description=train_tokenizer.__doc__)
  train.add_argument("--input", nargs="+", required=True, metavar="FILE", type=nonempty_path,
                     help="text files (paragraph documents) or .jsonl files (every string field)")
  train.add_argument("--vocab-size", type=int, required=True,
                     help=f"all ids, the mask and {NUM_SENTINELS} sentinels included")
  train.add_argument("--output", required=True, metavar="PREFIX", type=nonempty_path, help="writes PREFIX.model")
  train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
  train.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")


def run(args: argparse.Namespace) -> None:
  path = train_tokenizer(args.input, args.vocab_size, args.output, args.model_type, overwrite=args.overwrite)
  tokenizer = Tokenizer(path)
  print(f"wrote {path}: {tokenizer.vocab_size} ids (mask {tokenizer.mask_id}, "
        f"sentinels {tokenizer.sentinel_id(NUM_SENTINELS - 1)}..{tokenizer.sentinel_id(0)})")
