"""The data layer: corpora, tokenizers, TFDS datasets, objectives and the grain loader.

  documents.py     local files -> documents (paragraphs, JSONL records), errors naming file and line
  tokenizer.py     SentencePiece with fixed special ids; `tokenizer train`
  tfds_text.py     local files as TFDS datasets in array_record format, read without TensorFlow
  sources.py       `data.dataset` -> the records of a split (bundled corpora, files, TFDS catalog)
  objectives/      records -> token-id examples -> T5X features, one module per objective
  config.py        `default_data_config()` and its validation
  loader.py        `make_loader`: the grain pipeline a trainer iterates and checkpoints
"""
