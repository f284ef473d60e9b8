"""`data.dataset` values: bundled corpora, file lists and globs, and their errors."""

import json
import re
import shutil
import time

import pytest
import tensorflow_datasets as tfds

from models.config import ConfigError
from t5x_like.data import sources


def test_bundled_austen_builds_in_seconds_with_a_five_percent_validation_split(data_dir):
  start = time.perf_counter()
  train = sources.open_split("austen", "train", ("text",), data_dir)
  validation = sources.open_split("austen", "validation", ("text",), data_dir)
  assert time.perf_counter() - start < 20
  # Paragraphs counted apart from documents.paragraphs: non-blank runs between blank lines.
  paragraphs = sum(len([block for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if block.strip()])
                   for path in sources.BUNDLED["austen"].files)
  assert len(sources.BUNDLED["austen"].files) == 6 and len(train) + len(validation) == paragraphs
  assert 0.03 < len(validation) / paragraphs < 0.07


def test_bundled_hhh_pairs_load_all_221(data_dir):
  fields = ("prompt", "chosen", "rejected")
  splits = [sources.open_split("hhh", split, fields, data_dir) for split in ("train", "validation")]
  assert sum(len(s) for s in splits) == 221
  record = splits[0][0]
  assert set(record) == set(fields) and all(isinstance(v, bytes) and v for v in record.values())
  # As SFT data the pairs serve their preferred answer as the response.
  sft = sources.open_split("hhh", "train", ("prompt", "response"), data_dir)
  lines = [json.loads(line) for line in sources.BUNDLED["hhh"].files[0].read_text().splitlines()]
  chosen = {(r["prompt"], r["chosen"]) for r in lines}
  assert all((sft[i]["prompt"].decode(), sft[i]["response"].decode()) in chosen for i in range(len(sft)))


def test_files_and_globs(tmp_path):
  for name in ("b.txt", "a.txt", "c.md"):
    (tmp_path / name).write_text(f"Text of {name}.\n", encoding="utf-8")
  assert sources.local_files(f"{tmp_path}/*.txt, {tmp_path}/c.md") == [
      str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "c.md")]
  with pytest.raises(ConfigError, match=r"data.dataset=.*: no file matches '.*/\*\.json'; give a bundled"):
    sources.local_files(f"{tmp_path}/*.txt,{tmp_path}/*.json")
  with pytest.raises(ConfigError, match=r"data.dataset=' , ' names no dataset"):
    sources.local_files(" , ")
  # Overlapping globs name a file once; an existing path is not read as a glob; a directory is named.
  (tmp_path / "notes[2024].txt").write_text("Bracketed.\n", encoding="utf-8")
  (tmp_path / "sub.txt").mkdir()
  assert sources.local_files(f"{tmp_path}/a.txt,{tmp_path}/*.txt,{tmp_path}/notes[2024].txt") == [
      str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "notes[2024].txt")]
  with pytest.raises(ConfigError, match=r"'.*/sub\.txt' is a directory; name its files, e\.g\. .*/sub\.txt/\*\.txt"):
    sources.local_files(f"{tmp_path}/sub.txt")
  # ** is any depth of directories, none included.
  (tmp_path / "deep" / "er").mkdir(parents=True)
  for name in ("deep/top.txt", "deep/er/low.txt"):
    (tmp_path / name).write_text("Nested.\n", encoding="utf-8")
  assert sources.local_files(f"{tmp_path}/deep/**/*.txt") == [str(tmp_path / "deep/er/low.txt"),
                                                              str(tmp_path / "deep/top.txt")]


def test_a_split_no_record_falls_in_is_an_error(tmp_path):
  (tmp_path / "one.txt").write_text("A single paragraph.\n", encoding="utf-8")
  present = "train" if sources.tfds_text.split_of("A single paragraph.") == "train" else "validation"
  missing = "validation" if present == "train" else "train"
  assert len(sources.open_split(str(tmp_path / "one.txt"), present, ("text",), tmp_path / "tfds")) == 1
  with pytest.raises(ConfigError, match=rf"one\.txt' has no {missing} records"):
    sources.open_split(str(tmp_path / "one.txt"), missing, ("text",), tmp_path / "tfds")


def test_a_built_dataset_damaged_on_disk_is_named_with_its_directory_and_rebuilt_once_deleted(tmp_path):
  """A build cut short or a disk error: array_record raised a RuntimeError at the first batch."""
  (tmp_path / "text.txt").write_text("\n\n".join(f"Paragraph {i} of the text." for i in range(200)), encoding="utf-8")
  records = len(sources.open_split(str(tmp_path / "text.txt"), "train", ("text",), tmp_path / "tfds"))
  [built] = (tmp_path / "tfds").rglob("*-train.array_record-*")
  built.write_bytes(built.read_bytes()[:1000])
  with pytest.raises(ConfigError, match=rf"the train split built in {built.parent} cannot be read \(RuntimeError: "
                                        rf".*\); delete {built.parent} and it is built again from the files"):
    sources.open_split(str(tmp_path / "text.txt"), "train", ("text",), tmp_path / "tfds")
  shutil.rmtree(built.parent)
  assert len(sources.open_split(str(tmp_path / "text.txt"), "train", ("text",), tmp_path / "tfds")) == records


class T5xLikeTestCatalog(tfds.core.GeneratorBasedBuilder):
  """A catalog dataset of this test's own, registered by its name as TFDS's catalog builders are."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # nothing to download, so no checksums file to look up

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split):
    for index in range(3):
      yield index, {"text": f"{split} record {index}"}


class T5xLikeTrainOnlyCatalog(T5xLikeTestCatalog):
  """One split, as Wikipedia has."""

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train")}


def test_a_catalog_dataset_is_read_once_built_and_named_otherwise(tmp_path):
  name = "tfds:t5x_like_test_catalog"
  with pytest.raises(ConfigError, match=rf"data.dataset='{name}' is not built in data.data_dir='{tmp_path}'; build it "
                                        r"with `tfds build t5x_like_test_catalog --file_format=array_record"):
    sources.open_split(name, "train", ("text",), str(tmp_path))
  assert not list(tmp_path.rglob("*.array_record*"))  # nothing fetched or built
  T5xLikeTestCatalog(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  validation = sources.open_split(name, "validation", ("text",), str(tmp_path))
  texts = sorted(validation[i]["text"] for i in range(len(validation)))
  assert texts == [b"validation record %d" % i for i in range(3)]
  with pytest.raises(ConfigError, match=r"'tfds:no_such_dataset_here' is not in TFDS's catalog"):
    sources.open_split("tfds:no_such_dataset_here", "train", ("text",), str(tmp_path))
  with pytest.raises(ConfigError, match=r"has no \['prompt', 'response'\] feature\(s\), which data.objective reads; "
                                        r"its features are \['text'\]"):
    sources.open_split(name, "train", ("prompt", "response"), str(tmp_path))
  T5xLikeTrainOnlyCatalog(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  assert len(sources.open_split("tfds:t5x_like_train_only_catalog", "train", ("text",), str(tmp_path))) == 3
  with pytest.raises(ConfigError, match=r"'tfds:t5x_like_train_only_catalog' has no 'validation' split \(it has "
                                        r"\['train'\]\); training reads 'train' and evaluates on 'validation'"):
    sources.open_split("tfds:t5x_like_train_only_catalog", "validation", ("text",), str(tmp_path))
  for malformed in ("", "my-data", "a/b/c/d", "t5x_like_test_catalog/no_such_config"):
    with pytest.raises(ConfigError, match=rf"data.dataset='tfds:{malformed}': TFDS makes no builder of it "
                                          r"\(ValueError: \S.*\); its names are NAME, NAME/CONFIG or "
                                          r"NAME/CONFIG:VERSION"):
      sources.open_split(f"tfds:{malformed}", "train", ("text",), str(tmp_path))


def test_a_data_dir_that_cannot_hold_datasets_is_named(tmp_path):
  (tmp_path / "a_file").write_text("not a directory\n")
  with pytest.raises(ConfigError, match=r"data.data_dir='.*a_file/sub' cannot hold the built datasets: "):
    sources.open_split("austen", "train", ("text",), str(tmp_path / "a_file" / "sub"))
