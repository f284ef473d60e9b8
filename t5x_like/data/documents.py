"""Local files as documents: paragraphs of text files, records of JSON-lines files.

A file named `*.jsonl` holds one JSON object per line; any other file is plain UTF-8 text
(a byte-order mark is dropped; CRLF and lone CR line ends read as LF). In a text file a
blank line ends a paragraph and each paragraph is one document. Inside a paragraph the line
breaks are the printer's layout (the bundled novels keep one printed line per line), so its
lines are stripped and joined with single spaces; paragraphs of only whitespace are no
documents, and neither are JSONL records whose fields read are all whitespace. Text whose
line breaks matter (verse, code) belongs in the `text` field of a JSONL file, where it is
kept exactly.

Every problem with a file is a DataError naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator, Mapping, Sequence

from models.config import ConfigError


class DataError(ConfigError):
  """A data file that cannot be used; the message names the file, the line and the fix."""


def is_jsonl(path: str | pathlib.Path) -> bool:
  return pathlib.Path(path).suffix.lower() == ".jsonl"


# The first bytes of compressed files, which would otherwise fail as bytes that are not UTF-8.
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
              b"PK\x03\x04": "zip"}


def read_utf8(path: str | pathlib.Path) -> str:
  """The file's text; an empty file or bytes that are not UTF-8 are errors naming the line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  data = path.read_bytes()
  kind = next((kind for magic, kind in COMPRESSED.items() if data.startswith(magic)), None)
  if kind:
    raise DataError(f"{path} is {kind}-compressed; decompress it: data files are plain UTF-8 text or JSONL")
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    raise DataError(
        f"{path}, line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8; "
        f"convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
  if not text.strip():
    raise DataError(f"{path} is empty; remove it from the data files")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def paragraphs(path: str | pathlib.Path) -> Iterator[tuple[int, str]]:
  """(line number where it starts, text) for each paragraph of a text file."""
  start, lines = 0, []
  for number, line in enumerate(read_utf8(path).split("\n"), start=1):
    if line.strip():
      start = start or number
      lines.append(line.strip())
    elif lines:
      yield start, " ".join(lines)
      start, lines = 0, []
  if lines:
    yield start, " ".join(lines)


def jsonl_objects(path: str | pathlib.Path) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
  object is an error naming it."""
  for number, line in enumerate(read_utf8(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise DataError(f"{path}, line {number}: not valid JSON ({error.msg} at column "
                      f"{error.colno}); write one JSON object per line") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}, line {number}: a JSONL record must be a JSON object, "
                      f"got {type(record).__name__}")
    for key, value in record.items():  # JSON's \ud800 escapes parse, but no UTF-8 holds them
      if isinstance(value, str):
        try:
          value.encode("utf-8")
        except UnicodeEncodeError as error:
          raise DataError(f"{path}, line {number}: {key!r} holds {value[error.start:error.end]!r}, an unpaired "
                          f"surrogate escape (half a character); re-encode the source or remove it") from None
    yield number, record


def jsonl_records(path: str | pathlib.Path, fields: Sequence[str] | None = None,
                  aliases: Mapping[str, str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, {field: text}) for each record of a JSONL file.

  `fields` are the string fields to read (all string fields when None); `aliases` reads a
  field under another key (the bundled HHH pairs serve `response` from `chosen`).
  """
  aliases = dict(aliases or {})
  found = False
  for number, record in jsonl_objects(path):
    if fields is None:
      yield number, {k: v for k, v in record.items() if isinstance(v, str)}
      found = True
      continue
    values = {}
    for field in fields:
      key = aliases.get(field, field)
      if key not in record:
        raise DataError(f"{path}, line {number}: no field {key!r} (the record has "
                        f"{sorted(record)}); every record needs {sorted(aliases.get(f, f) for f in fields)}")
      if not isinstance(record[key], str):
        raise DataError(f"{path}, line {number}: field {key!r} must be a string, "
                        f"got {type(record[key]).__name__}")
      values[field] = record[key]
    if not any(value.strip() for value in values.values()):
      continue  # no document, as a blank paragraph is none
    found = True
    yield number, values
  if not found:
    raise DataError(f"{path} has no records with text; remove it from the data files")


def records(path: str | pathlib.Path, fields: Sequence[str],
            aliases: Mapping[str, str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, {field: text}) for each document of a file, JSONL or text, as training reads them."""
  _refuse_json(path)
  if is_jsonl(path):
    yield from jsonl_records(path, fields, aliases)
  elif tuple(fields) == ("text",):
    for line, text in paragraphs(path):
      yield line, {"text": text}
  else:
    raise DataError(f"{path} is a text file, which has only a `text` field, but "
                    f"{sorted(fields)} are needed; use a .jsonl file with these fields")


def _refuse_json(path: str | pathlib.Path) -> None:
  """A .json file would be read as one paragraph of brackets and quotes."""
  if pathlib.Path(path).suffix.lower() == ".json":
    raise DataError(f"{path} is a .json file; data files are text or JSONL (one JSON object per line, named "
                    f".jsonl): convert it, e.g. `jq -c '.[]' {path} > {pathlib.Path(path).with_suffix('.jsonl')}`")


def texts(path: str | pathlib.Path) -> Iterator[str]:
  """Every text of a file, for training a tokenizer: paragraphs, or a record's string fields."""
  _refuse_json(path)
  if is_jsonl(path):
    for _, record in jsonl_records(path):
      yield from (value for value in record.values() if value)
  else:
    for _, text in paragraphs(path):
      yield text
