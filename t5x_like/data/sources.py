"""`data.dataset` -> the records of one split, as a random-access source grain can read.

  'austen', 'moby_dick', 'hhh'      the bundled corpora (corpora/README.md)
  'notes/*.txt,more/a.jsonl'        local files: comma-separated paths or globs
  'tfds:NAME[/CONFIG][:VERSION]'    a TFDS catalog dataset already prepared in array_record
                                    format under data.data_dir (see tfds_text.catalog_source)

Local files, the bundled ones included, are built into data.data_dir on first use
(tfds_text.prepare); records are dicts of UTF-8 bytes, one entry per field read.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from typing import Sequence

from models.config import ConfigError
from t5x_like.data import tfds_text

CORPORA = pathlib.Path(__file__).parent / "corpora"


@dataclasses.dataclass(frozen=True)
class Bundled:
  files: tuple[pathlib.Path, ...]
  aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> JSON key


BUNDLED = {
    "austen": Bundled(tuple(sorted((CORPORA / "austen").glob("*.txt")))),
    "moby_dick": Bundled((CORPORA / "heldout" / "moby_dick.txt",)),
    # Supervised fine-tuning on the pairs learns the preferred answer.
    "hhh": Bundled((CORPORA / "preference" / "hhh_alignment_pairs.jsonl",), {"response": "chosen"}),
}
CATALOG_PREFIX = "tfds:"


def absolute_dataset(spec: str) -> str:
  """data.dataset with its local paths and globs made absolute: a workdir's config.json then
  names the same files wherever eval or decode runs."""
  if spec in BUNDLED or spec.startswith(CATALOG_PREFIX):
    return spec
  return ",".join(os.path.abspath(os.path.expanduser(part.strip())) for part in spec.split(",") if part.strip())


def local_files(spec: str) -> list[str]:
  """The files a comma-separated list of paths or globs names, in a stable order, each once
  (overlapping globs would otherwise train on a file twice). A path that exists is taken as
  it is, even if it looks like a glob (`notes[2024].txt`); globs match files, not directories, and
  `**` matches any depth of directories."""
  files = []
  for pattern in filter(None, (part.strip() for part in spec.split(","))):
    path = pathlib.Path(pattern).expanduser()
    if path.is_dir():
      raise ConfigError(f"data.dataset={spec!r}: {pattern!r} is a directory; name its files, e.g. {pattern}/*.txt")
    matches = [str(path)] if path.is_file() else sorted(m for m in glob.glob(str(path), recursive=True)
                                                               if pathlib.Path(m).is_file())
    if not matches:
      raise ConfigError(
          f"data.dataset={spec!r}: no file matches {pattern!r}; give a bundled corpus "
          f"({', '.join(BUNDLED)}), comma-separated files or globs, or {CATALOG_PREFIX}NAME")
    files.extend(matches)
  if not files:
    raise ConfigError(f"data.dataset={spec!r} names no dataset")
  unique, seen = [], set()
  for file in files:
    if pathlib.Path(file).resolve() not in seen:
      seen.add(pathlib.Path(file).resolve())
      unique.append(file)
  return unique


def open_split(dataset: str, split: str, fields: Sequence[str], data_dir: str):
  """The records of `split` ('train' or 'validation'), reading `fields`."""
  if dataset.startswith(CATALOG_PREFIX):
    return tfds_text.catalog_source(dataset[len(CATALOG_PREFIX):], split, data_dir, fields)
  if split not in tfds_text.SPLITS:
    raise ConfigError(f"split {split!r} is not one of {tfds_text.SPLITS}")
  if dataset in BUNDLED:
    bundled = BUNDLED[dataset]
    files, label = bundled.files, dataset
    aliases = {field: key for field, key in bundled.aliases.items() if field in fields}
  else:
    files, label, aliases = local_files(dataset), "files", {}
  builder = tfds_text.prepare(files, fields, data_dir, label=label, aliases=aliases)
  if split not in builder.info.splits:
    raise ConfigError(f"data.dataset={dataset!r} has no {split} records ({tfds_text.VALIDATION_PERCENT}% "
                      f"of records fall in validation, by a hash of their text); add data")
  return tfds_text.readable_source(builder, split, f"delete {builder.data_dir} and it is built again from the "
                                                   f"files")
