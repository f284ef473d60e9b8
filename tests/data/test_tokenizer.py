"""The fixed id layout, exact round trips, loading foreign models, training and its CLI."""

import pathlib
import re

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from models.config import ConfigError
from t5x_like import cli
from t5x_like.data import tokenizer as tokenizer_lib
from t5x_like.data.documents import DataError
from t5x_like.data.tokenizer import EOS_ID, NUM_SENTINELS, PAD_ID, UNK_ID, Tokenizer

ROUND_TRIP = ["It is a truth universally acknowledged.", "  two  leading spaces, tab\there\nnewline ",
              "café, naïve, ☃ and 日本語 🙂", "", " ", "\n\n", "Mr. Darcy's £10,000 a year!"]


def test_shipped_tokenizer_layout(tokenizer):
  assert tokenizer.vocab_size == 8192  # fits experiments/*_tiny.py
  sp = tokenizer._sp
  assert [sp.id_to_piece(i) for i in (PAD_ID, EOS_ID, UNK_ID)] == ["<pad>", "</s>", "<unk>"]
  assert tokenizer.mask_id == 8192 - 1 - NUM_SENTINELS == sp.get_piece_size()
  assert tokenizer.sentinel_id(0) == 8191 and tokenizer.sentinel_id(NUM_SENTINELS - 1) == 8092
  with pytest.raises(ValueError, match="sentinel 100 out of range"):
    tokenizer.sentinel_id(NUM_SENTINELS)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_exact_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and (ids >= 3).all() and (ids < tokenizer.mask_id).all()
  assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_token_byte_lengths_sum_to_the_texts_utf8_bytes(tokenizer, text):
  assert tokenizer.byte_lengths[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))
  specials = [PAD_ID, EOS_ID, tokenizer.mask_id, tokenizer.sentinel_id(0)]
  assert (tokenizer.byte_lengths[specials] == 0).all()
  assert tokenizer.byte_lengths[UNK_ID] == 1  # a character the pieces lack: one byte at least


def test_concatenated_encodings_decode_to_concatenated_text(tokenizer):
  prompt, response = "\n\nHuman: Who is Emma?\n\nAssistant:", " A heroine of Austen's."
  ids = np.concatenate([tokenizer.encode(prompt), tokenizer.encode(response)])
  assert tokenizer.decode(ids) == prompt + response


def test_decode_stops_at_eos_skips_pad_and_names_specials(tokenizer):
  a, b = tokenizer.encode("Emma"), tokenizer.encode(" wept")
  ids = [*a, tokenizer.sentinel_id(0), PAD_ID, *b, tokenizer.mask_id, tokenizer.sentinel_id(7), EOS_ID, *a]
  assert tokenizer.decode(ids) == "Emma<extra_id_0> wept<mask><extra_id_7>"
  with pytest.raises(ValueError, match=r"id 8192 is outside the 8192 ids of tokenizer .*austen_bpe_8k\.model"):
    tokenizer.decode([5, 8192])


def test_a_model_with_other_special_ids_is_remapped(tmp_path):
  """SentencePiece's defaults (unk=0, bos=1, eos=2, no pad), as in most models trained elsewhere."""
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["the cat sat on the mat"] * 50 + ["a dog ran"] * 50),
                                 model_prefix=str(tmp_path / "foreign"), vocab_size=18, minloglevel=2)
  foreign = Tokenizer(tmp_path / "foreign.model")
  sp = foreign._sp
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  assert foreign.vocab_size == 3 + 16 + 1 + NUM_SENTINELS  # its unk and eos take ids 2 and 1, bos is ordinary
  np.testing.assert_array_equal(foreign._to_id[[0, 2]], [UNK_ID, EOS_ID])
  ids = foreign.encode("the cat ran")
  assert (ids >= 3).all() and foreign.decode(ids) == "the cat ran"
  assert foreign.decode([*ids, EOS_ID, *ids]) == "the cat ran"
  assert UNK_ID in foreign.encode("zebra")  # its unknown piece (no byte fallback) maps to ours


def test_missing_and_broken_model_files(tmp_path):
  with pytest.raises(DataError, match=r"neither a shipped tokenizer \(austen_bpe_8k\) nor an existing"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "none.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a protobuf")
  with pytest.raises(DataError, match=r"junk\.model is not a SentencePiece model"):
    Tokenizer(junk)


def _small_text(tmp_path) -> pathlib.Path:
  path = tmp_path / "small.txt"
  path.write_text("\n\n".join(f"Paragraph {i} says the quick brown fox jumps over {i % 7} lazy dogs."
                              for i in range(200)), encoding="utf-8")
  return path


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tiny_tokenizer(tmp_path, model_type):
  path = tokenizer_lib.train_tokenizer([_small_text(tmp_path)], 410, tmp_path / "tiny", model_type)
  assert path == tmp_path / "tiny.model"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt", "tiny.model"]
  tiny = Tokenizer(path)
  assert tiny.vocab_size == 410
  text = "The quick fox, naïvely: 42 dogs!"
  assert tiny.decode(tiny.encode(text)) == text  # byte fallback covers unseen characters
  assert model_type_of(path) == model_type.upper()  # both pass the checks above; the model says which it is


def model_type_of(path) -> str:
  """The algorithm a SentencePiece model file was trained with, as its proto records it."""
  proto = sentencepiece_model_pb2.ModelProto.FromString(pathlib.Path(path).read_bytes())
  return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)


def test_a_text_longer_than_sentencepieces_limit_is_trained_on(tmp_path):
  """SentencePiece leaves texts past max_sentence_length out of training without a word; this
  paragraph (no blank line in 96 KiB) holds the corpus's only Cyrillic letter."""
  path = _small_text(tmp_path)
  with path.open("a", encoding="utf-8") as file:
    file.write("\n" + " ".join(f"\u0436eta{i % 50}" for i in range(14000)) + "\n")
  assert path.stat().st_size > 3 * tokenizer_lib.MAX_SENTENCE_BYTES // 2
  model = tokenizer_lib.train_tokenizer([path], 410, tmp_path / "tiny")
  pieces = spm.SentencePieceProcessor(model_file=str(model))
  assert pieces.encode("\u0436", out_type=str) == ["\u0436"]  # a piece of its own, not its two bytes


def test_vocabulary_smaller_than_the_special_ids_is_an_error(tmp_path):
  smallest = tokenizer_lib.min_vocab_size()
  assert smallest == 3 + 256 + 1 + NUM_SENTINELS + 1
  with pytest.raises(ConfigError, match=rf"--vocab-size 300 is too small: the special ids need "
                                        rf"{smallest - 1} \(pad, eos, unk, 256 byte-fallback "
                                        rf"pieces, the mask and 100 sentinels\)"):
    tokenizer_lib.train_tokenizer([_small_text(tmp_path)], 300, tmp_path / "tiny")


def test_sentencepiece_failure_names_the_files_and_the_vocab_size_that_trains(tmp_path):
  """The bound named is in --vocab-size's units, which count the mask and sentinels
  (SentencePiece's own "<= 308" meant 409): it trains, and one past it fails."""
  with pytest.raises(DataError, match=r"could not train 20000 ids on 1 file\(s\) \(.*small\.txt\): the text makes "
                                      r"at most \d+ pieces; use --vocab-size (\d+) or less, or more text$") as failed:
    tokenizer_lib.train_tokenizer([_small_text(tmp_path)], 20000, tmp_path / "tiny", "unigram")
  most = int(re.search(r"--vocab-size (\d+) or less", str(failed.value))[1])
  tokenizer_lib.train_tokenizer([_small_text(tmp_path)], most, tmp_path / "most", "unigram")
  with pytest.raises(DataError, match=rf"use --vocab-size {most} or less"):
    tokenizer_lib.train_tokenizer([_small_text(tmp_path)], most + 1, tmp_path / "past", "unigram")
  # Text of more distinct characters than the ids left for pieces: more ids, not fewer.
  (tmp_path / "many.txt").write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 60)) + "\n")
  with pytest.raises(DataError, match=r"could not train 381 ids .*: the text's characters and the byte and special "
                                      r"pieces take \d+ pieces; use --vocab-size \d+ or more$") as failed:
    tokenizer_lib.train_tokenizer([tmp_path / "many.txt"], tokenizer_lib.min_vocab_size() + 20, tmp_path / "many")
  least = int(re.search(r"--vocab-size (\d+) or more", str(failed.value))[1])
  tokenizer_lib.train_tokenizer([tmp_path / "many.txt"], least, tmp_path / "least")
  with pytest.raises(DataError, match=rf"use --vocab-size {least} or more"):
    tokenizer_lib.train_tokenizer([tmp_path / "many.txt"], least - 1, tmp_path / "below")


def test_cli_main_trains_and_reports_errors(tmp_path, capsys):
  corpus = _small_text(tmp_path)
  assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
                   "--output", str(tmp_path / "cli")]) == 0
  assert "cli.model: 400 ids (mask 299, sentinels 300..399)" in capsys.readouterr().out
  assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "10",
                   "--output", str(tmp_path / "cli")]) == 2
  assert "t5x-like tokenizer: error: --vocab-size 10 is too small" in capsys.readouterr().err
  trained = (tmp_path / "cli.model").read_bytes()
  (tmp_path / "a_file").write_text("x\n")
  for output, message in ((tmp_path / "cli", "cli.model exists; --overwrite replaces it"),
                          (tmp_path / "cli.model", "cli.model exists; --overwrite replaces it"),
                          (tmp_path, "is a directory; give a prefix"),
                          (tmp_path / "a_file" / "tok", "cannot make")):
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
                     "--output", str(output)]) == 2
    assert message in capsys.readouterr().err, output
  assert (tmp_path / "cli.model").read_bytes() == trained
  assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "410", "--output",
                   str(tmp_path / "cli.model"), "--overwrite"]) == 0
  assert Tokenizer(tmp_path / "cli.model").vocab_size == 410 and not (tmp_path / "cli.model.model").exists()
  assert model_type_of(tmp_path / "cli.model") == "BPE"  # the default
  assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "410", "--output",
                   str(tmp_path / "unigram"), "--model-type", "unigram"]) == 0
  assert model_type_of(tmp_path / "unigram.model") == "UNIGRAM"
