"""Shared data fixtures: one TFDS cache per test session, the shipped tokenizer, a small corpus."""

import pathlib

import pytest

from t5x_like.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tokenizer():
  return load_tokenizer("austen_bpe_8k")


def _unique_paragraphs(count: int, words: int = 6) -> list[str]:
  """Distinct short paragraphs: paragraph i is 'pi wi0 ...' with numbered words."""
  return [" ".join([f"p{i}"] + [f"w{(i * 7 + j) % 50}" for j in range(words)]) for i in range(count)]


@pytest.fixture
def small_corpus(tmp_path) -> pathlib.Path:
  """A text file of 60 distinct paragraphs, two long enough to be split at seq_len 64."""
  paragraphs = _unique_paragraphs(60)
  paragraphs[5] = " ".join(f"long{i}" for i in range(80))
  paragraphs[17] = " ".join(f"longer{i}" for i in range(150))
  path = tmp_path / "corpus.txt"
  path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
  return path
