"""Local files built as array_record TFDS datasets: splits, reuse, rebuilds and bad files."""

import json
import os
import pathlib
import subprocess
import sys
import time
import zlib

import pytest

from t5x_like.data import documents, tfds_text
from t5x_like.data.documents import DataError


def _texts(source) -> list[str]:
  return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def _all_texts(builder) -> list[str]:
  """Texts of every split written (a split no record falls in is not)."""
  return sorted(text for split in builder.info.splits for text in _texts(builder.as_data_source(split)))


def in_validation(text: str) -> bool:
  """The documented rule, written out here: crc32 of the text (UTF-8), mod 100, below 5. A hash
  that differs between processes (Python's hash()) would split each host's data differently."""
  return zlib.crc32(text.encode("utf-8")) % 100 < 5


def test_every_paragraph_lands_in_exactly_the_split_its_hash_picks(small_corpus, tmp_path):
  builder = tfds_text.prepare([small_corpus], ("text",), tmp_path / "tfds")
  train, validation = (_texts(builder.as_data_source(split)) for split in tfds_text.SPLITS)
  paragraphs = [text for _, text in documents.paragraphs(small_corpus)]
  assert sorted(train + validation) == sorted(paragraphs)
  assert validation and all(in_validation(text) for text in validation)
  assert not any(in_validation(text) for text in train)


def test_records_sharing_a_prompt_share_a_split(tmp_path):
  """The first field decides: a prompt never sits in validation with its other responses in train."""
  prompts = [f"Question {i}?" for i in range(60)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "response": f"Answer {j} to {p}"}) + "\n"
                          for p in prompts for j in range(3)), encoding="utf-8")
  builder = tfds_text.prepare([path], ("prompt", "response"), tmp_path / "tfds")
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    rows = [source[i] for i in range(len(source))]
    assert all(in_validation(row["prompt"].decode()) == (split == "validation") for row in rows)
    assert all(sum(r["prompt"] == row["prompt"] for r in rows) == 3 for row in rows)


def test_prepare_reuses_a_build_and_rebuilds_an_edited_file(small_corpus, tmp_path):
  first = tfds_text.prepare([small_corpus], ("text",), tmp_path / "tfds")
  again = tfds_text.prepare([small_corpus], ("text",), tmp_path / "tfds")
  assert again.data_dir == first.data_dir
  small_corpus.write_text("One new paragraph.\n", encoding="utf-8")
  os.utime(small_corpus, ns=(time.time_ns(), time.time_ns() + 10**9))
  edited = tfds_text.prepare([small_corpus], ("text",), tmp_path / "tfds")
  assert edited.data_dir != first.data_dir
  assert _all_texts(edited) == ["One new paragraph."]


def test_text_and_jsonl_files_mix_when_only_text_is_read(tmp_path):
  (tmp_path / "a.txt").write_text("From a text file.\n", encoding="utf-8")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Verse\n  keeps its lines.", "id": 7}) + "\n",
                                    encoding="utf-8")
  builder = tfds_text.prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], ("text",), tmp_path / "tfds")
  assert _all_texts(builder) == ["From a text file.", "Verse\n  keeps its lines."]


def test_bad_files_fail_the_build_with_file_and_line(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine\n\nbroken \xff byte\n")
  with pytest.raises(DataError, match=r"bad\.txt, line 3, column 8: byte 0xff is not UTF-8"):
    tfds_text.prepare([bad], ("text",), tmp_path / "tfds")
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text('{"prompt": "Q", "chosen": "A"}\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"pairs\.jsonl, line 1: no field 'rejected'"):
    tfds_text.prepare([pairs], ("prompt", "chosen", "rejected"), tmp_path / "tfds")
  with pytest.raises(DataError, match=r"bad\.txt is a text file, which has only a `text` field"):
    tfds_text.prepare([bad], ("prompt", "response"), tmp_path / "tfds")
  with pytest.raises(DataError, match=r"missing\.txt: no such file"):
    tfds_text.prepare([tmp_path / "missing.txt"], ("text",), tmp_path / "tfds")


def test_processes_of_one_host_share_a_data_dir(small_corpus, tmp_path, outputs_of):
  """Two processes prepare the same dataset at once: one builds, the other waits and reads it."""
  root = pathlib.Path(__file__).resolve().parents[2]
  script = ("import sys; from t5x_like.data import tfds_text; "
            "build = tfds_text.LocalFiles.download_and_prepare; "
            "tfds_text.LocalFiles.download_and_prepare = lambda self, **kw: print('built') or build(self, **kw); "
            "b = tfds_text.prepare([sys.argv[1]], ('text',), sys.argv[2]); "
            "print(sum(len(b.as_data_source(s)) for s in b.info.splits))")
  env = dict(os.environ, PYTHONPATH=str(root))
  runs = [subprocess.Popen([sys.executable, "-c", script, str(small_corpus), str(tmp_path / "tfds")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
          for _ in range(2)]
  outputs = [output.split() for output in outputs_of(runs, timeout=120)]
  assert [run.returncode for run in runs] == [0, 0]
  assert [out[-1] for out in outputs] == [str(len(list(documents.paragraphs(small_corpus))))] * 2
  assert sorted(out.count("built") for out in outputs) == [0, 1]
