"""Local text and JSONL files as TFDS datasets in array_record format, read without TensorFlow.

`prepare(files, fields, data_dir)` builds a dataset once, into
`data_dir/local_files/{label}_{fingerprint}/{version}/`, and later calls reuse it. The
fingerprint covers the files' paths, sizes and modification times, the fields read, the
split rule and the reading rules' version, so an edited file is rebuilt rather than read
stale. A file lock lets the processes of one host share a data_dir: one builds, the others
wait and reuse.

Split: a record is in `validation` when crc32 of its first field (the text, or the prompt)
mod 100 is below VALIDATION_PERCENT, else in `train`. The rule is deterministic, ignores
file order, and keeps equal texts (repeated chapter headings, pairs sharing a prompt) in
one split, so validation never shares a prompt with training. A split no record falls in
is not written (TFDS cannot write empty splits); reading it is an error naming the dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import pathlib
import zlib
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

from models.config import first_line
from t5x_like.data import documents

VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")


def split_of(key: str) -> str:
  return "validation" if zlib.crc32(key.encode("utf-8")) % 100 < VALIDATION_PERCENT else "train"


@dataclasses.dataclass
class LocalFilesConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # tfds logs the repr
  fields: tuple[str, ...] = ("text",)
  aliases: tuple[tuple[str, str], ...] = ()  # (field, JSON key it is read from)


class LocalFiles(tfds.core.GeneratorBasedBuilder):
  """Documents of local files, one string feature per field (see documents.py)."""

  # Part of the build's fingerprint: raised whenever documents.py changes how records are read, so
  # that older builds are not read (1.1.0: a byte-order mark, lone CRs, .JSONL, blank records).
  VERSION = tfds.core.Version("1.1.0")
  # No code directory to look up: nothing is downloaded, so there is no checksums file
  # (and tfds 4.9.10 would need the undeclared importlib_resources to look).
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    features = {field: tfds.features.Text() for field in self.builder_config.fields}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description="Local text/JSONL files (t5x_like.data.tfds_text).")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    # TFDS cannot write an empty split, and a few records may all hash into one.
    present = set()
    for _, record in self._keyed_records():
      present.add(split_of(record[self.builder_config.fields[0]]))
      if len(present) == len(SPLITS):
        break
    return {split: self._generate_examples(split) for split in SPLITS if split in present}

  def _generate_examples(self, split: str):
    for key, record in self._keyed_records():
      if split_of(record[self.builder_config.fields[0]]) == split:
        yield key, record

  def _keyed_records(self):
    config = self.builder_config
    for index, path in enumerate(config.files):
      for line, record in documents.records(path, config.fields, dict(config.aliases)):
        yield f"{index}:{line}", record


def _fingerprint(files: Sequence[str], fields: Sequence[str], aliases: Mapping[str, str]) -> str:
  digest = hashlib.sha256(repr((tuple(fields), sorted(aliases.items()), VALIDATION_PERCENT,
                                str(LocalFiles.VERSION))).encode())
  for path in files:
    stat = pathlib.Path(path).stat()
    digest.update(repr((path, stat.st_size, stat.st_mtime_ns)).encode())
  return digest.hexdigest()[:16]


@contextlib.contextmanager
def _host_lock(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(files: Sequence[str | pathlib.Path], fields: Sequence[str], data_dir: str | pathlib.Path,
            *, label: str = "files", aliases: Mapping[str, str] | None = None) -> LocalFiles:
  """The built dataset of these files (built now if missing); read it with `.as_data_source(split)`."""
  aliases = dict(aliases or {})
  files = [str(pathlib.Path(f).expanduser().resolve()) for f in files]
  for path in files:
    if not pathlib.Path(path).is_file():
      raise documents.DataError(f"{path}: no such file")
  data_dir = pathlib.Path(data_dir).expanduser()
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # a file in the way, or a place this user cannot write
    raise documents.DataError(f"data.data_dir={str(data_dir)!r} cannot hold the built datasets: {error}") from None
  name = f"{label}_{_fingerprint(files, fields, aliases)}"
  config = LocalFilesConfig(name=name, files=tuple(files), fields=tuple(fields),
                            aliases=tuple(sorted(aliases.items())),
                            description=f"{label}: {len(files)} file(s), fields {list(fields)}")
  with _host_lock(data_dir / f".{name}.lock"):
    # Made under the lock: a builder reads the dataset's info when made, so it must see
    # a build another process has just finished.
    builder = LocalFiles(config=config, data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()
  return builder


def catalog_source(name: str, split: str, data_dir: str | pathlib.Path, fields: Sequence[str]):
  """A TFDS catalog dataset the user prepared in array_record format, e.g. after
  `tfds build wikipedia/20230601.en --file_format=array_record --data_dir=DIR` (building
  catalog datasets needs TensorFlow; reading them here does not). Its features must carry
  the names the objective reads (`text`; `prompt`, `response`, ...)."""
  data_dir = str(pathlib.Path(data_dir).expanduser())
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise documents.DataError(f"data.dataset='tfds:{name}' is not in TFDS's catalog (tfds.list_builders() "
                              f"names them); local files are named by path, without tfds:") from None
  except ValueError as error:  # a malformed name or an unknown config; tfds's message goes on with its grammar
    raise documents.DataError(f"data.dataset='tfds:{name}': TFDS makes no builder of it ({first_line(error)}); "
                              f"its names are NAME, NAME/CONFIG or NAME/CONFIG:VERSION") from None
  if not builder.is_prepared():  # tfds.data_source would start a download; nothing is fetched at run time
    raise documents.DataError(f"data.dataset='tfds:{name}' is not built in data.data_dir={data_dir!r}; build it with "
                              f"`tfds build {name} --file_format=array_record --data_dir={data_dir}`")
  features = builder.info.features
  missing = [field for field in fields if field not in features]
  if missing:  # else the first batch would stop on a bare KeyError inside the loader
    raise documents.DataError(f"data.dataset='tfds:{name}' has no {missing} feature(s), which data.objective reads; "
                              f"its features are {sorted(features.keys())}")
  if split not in builder.info.splits:  # tfds would raise a bare ValueError at the first read
    raise documents.DataError(f"data.dataset='tfds:{name}' has no {split!r} split (it has "
                              f"{sorted(builder.info.splits.keys())}); training reads 'train' and evaluates on "
                              f"'validation', so it needs both: write its records to JSONL files and name those "
                              f"in data.dataset, which splits them by a hash of each record")
  return readable_source(builder, split, f"rebuild it with `tfds build {name} --file_format=array_record "
                                         f"--data_dir={data_dir}`")


def readable_source(builder: tfds.core.DatasetBuilder, split: str, remedy: str):
  """The split's data source, its first and last records read now: files of a build cut short or
  damaged on disk are named with their directory, where array_record raised a RuntimeError in
  the loader's thread at the first batch."""
  source = builder.as_data_source(split)
  try:
    for index in sorted({0, len(source) - 1}) if len(source) else ():
      source[index]
  except RuntimeError as error:
    raise documents.DataError(f"the {split} split built in {builder.data_dir} cannot be read "
                              f"({first_line(error)}); {remedy}") from None
  return source
