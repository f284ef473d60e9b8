"""Files -> documents, and an error naming the file and line for each kind of bad input."""

import bz2
import gzip
import json
import lzma
import zipfile

import pytest

from t5x_like.data import documents
from t5x_like.data.documents import DataError


def test_paragraphs_join_printed_lines_and_skip_blank_runs(tmp_path):
  path = tmp_path / "novel.txt"
  path.write_text("CHAPTER 1\n\n\nIt is a truth\n  universally acknowledged,  \n\n \n\t\nEnd.",
                  encoding="utf-8")
  assert list(documents.paragraphs(path)) == [
      (1, "CHAPTER 1"), (4, "It is a truth universally acknowledged,"), (9, "End.")]


@pytest.mark.parametrize("content", [b"one\r\ntwo\r\n\r\nthree\r\n", b"one\rtwo\r\rthree\r",
                                     b"\xef\xbb\xbfone\ntwo\n\nthree\n"])
def test_windows_and_old_mac_line_endings_and_a_byte_order_mark_read_like_unix(tmp_path, content):
  path = tmp_path / "dos.txt"
  path.write_bytes(content)
  assert [text for _, text in documents.paragraphs(path)] == ["one two", "three"]
  path = tmp_path / "marked.JSONL"  # the suffix in any case
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "one"}).encode() + b"\n")
  assert documents.is_jsonl(path) and list(documents.jsonl_records(path, ("text",))) == [(1, {"text": "one"})]


def test_jsonl_records_fields_aliases_and_blank_lines(tmp_path):
  path = tmp_path / "pairs.jsonl"
  lines = [json.dumps({"prompt": "Q1", "chosen": "A1", "rejected": "B1", "subset": "x"}), "",
           json.dumps({"prompt": "Q2", "chosen": "A2", "rejected": "B2", "n": 3})]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  assert list(documents.jsonl_records(path, ("prompt", "response"), {"response": "chosen"})) == [
      (1, {"prompt": "Q1", "response": "A1"}), (3, {"prompt": "Q2", "response": "A2"})]
  # Without a field list: every string field (the tokenizer trains on them).
  assert list(documents.texts(path)) == ["Q1", "A1", "B1", "x", "Q2", "A2", "B2"]
  # A record whose fields read are all blank is no document, as a blank paragraph is none; one
  # blank field of several (a response to no prompt) leaves a document.
  path.write_text("\n".join([json.dumps({"text": " \n"}), json.dumps({"text": "kept"})]) + "\n", encoding="utf-8")
  assert list(documents.jsonl_records(path, ("text",))) == [(2, {"text": "kept"})]
  path.write_text(json.dumps({"prompt": "", "response": "A"}) + "\n", encoding="utf-8")
  assert list(documents.jsonl_records(path, ("prompt", "response"))) == [(1, {"prompt": "", "response": "A"})]
  path.write_text(json.dumps({"text": ""}) + "\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"pairs\.jsonl has no records with text"):
    list(documents.jsonl_records(path, ("text",)))


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n"])
def test_empty_file_is_an_error_naming_it(tmp_path, content):
  path = tmp_path / "empty.txt"
  path.write_bytes(content)
  with pytest.raises(DataError, match=r"empty\.txt is empty; remove it"):
    list(documents.paragraphs(path))


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("first line\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin1\.txt, line 3, column 4: byte 0xe9 is not UTF-8; convert"):
    list(documents.paragraphs(path))


@pytest.mark.parametrize("kind, compress", [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)])
def test_a_compressed_file_is_named_as_compressed_not_as_bad_utf8(tmp_path, kind, compress):
  path = tmp_path / "docs.jsonl"
  path.write_bytes(compress(b'{"text": "hello"}\n'))
  with pytest.raises(DataError, match=rf"docs\.jsonl is {kind}-compressed; decompress it"):
    list(documents.records(path, ("text",)))


def test_a_zip_archive_is_named_as_compressed(tmp_path):
  path = tmp_path / "docs.txt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("inner.txt", "hello")
  with pytest.raises(DataError, match=r"docs\.txt is zip-compressed"):
    list(documents.paragraphs(path))


def test_a_json_array_file_is_refused_not_read_as_one_paragraph(tmp_path):
  path = tmp_path / "docs.json"
  path.write_text(json.dumps([{"text": "hello world"}, {"text": "second doc"}]))
  for read in (lambda: list(documents.records(path, ("text",))), lambda: list(documents.texts(path))):
    with pytest.raises(DataError, match=r"docs\.json is a \.json file; data files are text or JSONL .*`jq -c"):
      read()


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match=r"nope\.txt: no such file"):
    list(documents.paragraphs(tmp_path / "nope.txt"))


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Q"}', r"bad\.jsonl, line 2: no field 'response' \(the record has \['prompt'\]\)"),
    ('{"prompt": "Q", "response": 3}', r"bad\.jsonl, line 2: field 'response' must be a string, got int"),
    ('{"prompt": "Q", "response": "A"', r"bad\.jsonl, line 2: not valid JSON"),
    ('["Q", "A"]', r"bad\.jsonl, line 2: a JSONL record must be a JSON object, got list"),
    ('{"prompt": "Q", "response": "ab\\ud800c"}',
     r"bad\.jsonl, line 2: 'response' holds '\\ud800', an unpaired surrogate escape"),
])
def test_bad_jsonl_records_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n", encoding="utf-8")
  with pytest.raises(DataError, match=message):
    list(documents.jsonl_records(path, ("prompt", "response")))


def test_missing_aliased_field_names_the_json_key(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text('{"prompt": "Q", "rejected": "B"}\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"pairs\.jsonl, line 1: no field 'chosen'"):
    list(documents.jsonl_records(path, ("prompt", "response"), {"response": "chosen"}))
