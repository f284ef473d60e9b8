"""The inference commands on a tiny run trained through the CLI: train, decode, eval, score."""

import contextlib
import io
import json
import logging
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.transformer import build_model
from t5x_like import cli, evaluation
from t5x_like.data import sources
from t5x_like.cli import main
from t5x_like.config import apply_overrides, load_config
from t5x_like.data.loader import make_loader
from t5x_like.data.tokenizer import SHIPPED, load_tokenizer, train_tokenizer
from t5x_like.decoding import DecodeConfig, generate
from t5x_like.preemption import Preempted
from t5x_like.trainer import Trainer

EXPERIMENT = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "decoder_tiny.py")
TINY = ["--config.model.emb_dim=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.mlp_dim=64", "--config.model.num_layers=2", "--config.data.seq_len=32",
        "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_steps=1",
        "--config.train.checkpoint_every=4", "--config.data.worker_threads=0"]
logits = nnx.jit(lambda model, tokens: model(tokens))
prefix_logits = nnx.jit(lambda model, tokens, prefix: model(tokens, prefix_mask=prefix))


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
  """(workdir, what the train command printed)."""
  workdir = tmp_path_factory.mktemp("run")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert main(["train", "--config", EXPERIMENT, "--workdir", str(workdir), *TINY,
                 "--sample-prompt", "Emma"]) == 0
  return workdir, printed.getvalue()


@pytest.fixture(scope="module")
def run_dir(train_run):
  return train_run[0]


@pytest.fixture(scope="module")
def trained(run_dir):
  trainer = Trainer.from_workdir(run_dir)
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  return trainer, model, load_tokenizer(trainer.config.data.tokenizer)


def test_train_command_reports_and_samples(train_run):
  run_dir, printed = train_run
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  assert (run_dir / "checkpoints" / "4").exists()
  validation = [r for r in rows if r["split"] == "validation"][-1]
  assert f"step 4: validation loss {validation['loss']:.4f}" in printed
  assert "--- 'Emma'\nEmma" in printed  # the sample continues its prompt


def test_the_sft_experiment_starts_from_the_pretrained_run(trained, run_dir, tmp_path, caplog):
  sft = str(pathlib.Path(EXPERIMENT).with_name("decoder_tiny_sft.py"))
  # At learning rate 0 the tuned parameters stay those the run started from.
  assert main(["train", "--config", sft, "--workdir", str(tmp_path), *TINY, f"--config.train.init_from={run_dir}",
               "--config.train.steps=1", "--config.train.optimizer.learning_rate=0.0"]) == 0
  assert "warmup_steps=10 is not below train.steps=1" in caplog.text  # warned of as it trains...
  caplog.clear()
  tuned = Trainer.from_workdir(tmp_path)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # ...not as it loads
  assert tuned.config.data.objective == "sft" and int(tuned.state["step"]) == 1
  for a, b in zip(jax.tree.leaves(trained[0].state["params"]), jax.tree.leaves(tuned.state["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_text_file_loss_of_a_prefix_lm_run(trained):
  trainer, _, tokenizer = trained
  config = trainer.config.copy_and_resolve_references()
  config.data.objective = "prefix_lm"  # its batches carry decoder_causal_attention
  prefix_lm = Trainer(config, trainer.workdir / "prefix_lm", make_loader=trainer.make_loader)
  prefix_lm.state = trainer.state  # the trained parameters
  assert "decoder_causal_attention" in prefix_lm.features
  text = "Emma was handsome, clever, and rich."
  result = evaluation.evaluate_documents(prefix_lm, tokenizer, [text])
  assert result["tokens"] == len(tokenizer.encode(text)) + 1
  # Plain text has no prefix, so the prefix LM attends causally, as the decoder run does.
  assert result["loss"] == pytest.approx(evaluation.evaluate_documents(trainer, tokenizer, [text])["loss"], rel=1e-5)


@pytest.mark.parametrize("flags, config", [
    (["--strategy", "sample", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
      "--repetition-penalty", "1.3"],
     dict(strategy="sample", temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)),
    (["--strategy", "beam", "--num-beams", "3", "--length-penalty", "1.5"],
     dict(strategy="beam", num_beams=3, length_penalty=1.5)),
])
def test_decode_command_writes_what_generate_decodes_with_its_flags(flags, config, trained, run_dir, tmp_path):
  _, model, tokenizer = trained
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "Emma was"}\n{"prompt": "Mr. Knightley"}\n')
  out = tmp_path / "out.jsonl"
  assert main(["decode", "--workdir", str(run_dir), "--input", str(prompts), "--output", str(out),
               "--max-new-tokens", "5", *flags]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["Emma was", "Mr. Knightley"]
  ids = [[0] + tokenizer.encode(r["prompt"]).tolist() for r in rows]  # after the start token, as in training
  # Never the mask or a sentinel, which a decoder's targets never hold.
  config = DecodeConfig(max_new_tokens=5, vocab_limit=tokenizer.mask_id, **config)
  expected = generate(model, ids, config, seed=3 if "--seed" in flags else 0)
  assert [r["completion"] for r in rows] == [tokenizer.decode(tokens) for tokens in expected]


def test_an_encoder_decoder_run_decodes_the_span_its_prompt_marks(tmp_path, capsys):
  """README's `decode --prompt "...<extra_id_0>..."` on a span-corruption run: the encoder reads the
  prompt's ids (sentinel 0 added where none is written) and eos, the decoder starts from the start
  token, and every id of the tokenizer but the mask may come out, sentinels included. Its training
  samples too."""
  workdir = tmp_path / "t5"
  flags = ["--config.model.emb_dim=32", "--config.model.num_heads=2", "--config.model.head_dim=16",
           "--config.model.mlp_dim=64", "--config.model.num_layers=1", "--config.data.input_len=32",
           "--config.data.target_len=8", "--config.train.steps=2", "--config.train.log_every=1",
           "--config.train.eval_steps=1", "--config.train.checkpoint_every=2", "--config.data.worker_threads=0"]
  assert main(["train", "--config", str(pathlib.Path(EXPERIMENT).with_name("encoder_decoder_tiny.py")),
               "--workdir", str(workdir), *flags, "--sample-prompt", "She was"]) == 0
  printed = capsys.readouterr().out
  out = tmp_path / "out.jsonl"
  assert main(["decode", "--workdir", str(workdir), "--prompt", "Mr. Darcy", "--prompt", "She was<extra_id_0>",
               "--max-new-tokens", "6", "--output", str(out)]) == 0
  trainer = Trainer.from_workdir(workdir)
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  tokenizer = load_tokenizer(trainer.config.data.tokenizer)
  inputs = [tokenizer.encode(text).tolist() + [tokenizer.sentinel_id(0), 1] for text in ("Mr. Darcy", "She was")]
  # Every id but the mask, which span corruption's targets never hold: the sentinels lie above it.
  limits = dict(vocab_limit=tokenizer.vocab_size, excluded_ids=(tokenizer.vocab_size - 101,))
  expected = generate(model, [[0], [0]], DecodeConfig(max_new_tokens=6, **limits), encoder_inputs=inputs)
  assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == [
      tokenizer.decode(tokens) for tokens in expected]
  sample = generate(model, [[0]], DecodeConfig(max_new_tokens=40, repetition_penalty=1.2, **limits),
                    encoder_inputs=inputs[1:])[0]
  assert f"--- 'She was<extra_id_0>'\n{tokenizer.decode(sample)}\n" in printed, printed


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.7"], "--temperature applies to --strategy sample, not greedy"),
    (["--strategy", "beam", "--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p apply to --strategy sample, not beam"),
    (["--strategy", "sample", "--num-beams", "2"], "--num-beams applies to --strategy beam, not sample"),
    (["--seed", "3"], "--seed applies to --strategy sample, not greedy"),
    (["--strategy", "beam", "--seed", "3"], "--seed applies to --strategy sample, not beam"),
])
def test_decode_flags_its_strategy_would_ignore_are_refused(flags, message, run_dir, capsys):
  assert main(["decode", "--workdir", str(run_dir), "--prompt", "Emma", *flags]) == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["decode", "--workdir", "RUN", "--prompt", "Emma", "--output", ""],
                                     ["eval", "--workdir", "RUN", "--text-file", ""],
                                     ["eval", "--workdir", " "],
                                     ["score", "--workdir", "RUN", "--task", ""],
                                     ["train", "--config", "", "--workdir", "W"],
                                     ["tokenizer", "train", "--input", "", "--vocab-size", "400", "--output", "T"],
                                     ["fit", ""]])
def test_an_empty_path_is_refused_before_it_means_the_current_directory(command, run_dir, capsys):
  """An unset shell variable: `eval --text-file ""` scored the validation split instead, and
  `train --workdir ""` would have trained into the current directory."""
  with pytest.raises(SystemExit) as stopped:
    main([str(run_dir) if part == "RUN" else part for part in command])
  assert stopped.value.code == 2
  assert "an empty path (an unset shell variable?)" in capsys.readouterr().err


def test_decode_command_reads_a_prefix_lm_runs_prompts_both_ways(trained, run_dir, tmp_path):
  _, model, tokenizer = trained
  prefix_run = tmp_path / "prefix_lm"
  shutil.copytree(run_dir, prefix_run)
  config = json.loads((prefix_run / "config.json").read_text())
  config["data"]["objective"] = "prefix_lm"
  (prefix_run / "config.json").write_text(json.dumps(config))
  prompts = ["Emma was", "Mr. Knightley said"]
  out = tmp_path / "out.jsonl"
  assert main(["decode", "--workdir", str(prefix_run), "--output", str(out), "--max-new-tokens", "8",
               *[flag for p in prompts for flag in ("--prompt", p)]]) == 0
  completions = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
  ids = [[0] + tokenizer.encode(p).tolist() for p in prompts]
  expected = {prefix_lm: [tokenizer.decode(t) for t in generate(model, ids, DecodeConfig(
                  max_new_tokens=8, vocab_limit=tokenizer.mask_id, prefix_lm=prefix_lm))]
              for prefix_lm in (False, True)}
  assert completions == expected[True] != expected[False]


def test_text_file_scores_each_paragraph_as_training_reads_it(trained, tmp_path, capsys):
  """Paragraphs with their line breaks joined by spaces, each its own document: start token, text,
  eos, cut into pieces of seq_len that each start again from the start token."""
  trainer, model, tokenizer = trained
  length = trainer.config.data.seq_len
  lines = [["It is a truth universally acknowledged,", "that a single man in possession"],
           ["Emma Woodhouse, handsome, clever, and rich, " * 12], ["Café au lait."]]
  path = tmp_path / "held_out.txt"
  path.write_text("\n\n".join("\n".join(paragraph) for paragraph in lines) + "\n")
  texts = [" ".join(line.strip() for line in paragraph) for paragraph in lines]
  nats, tokens = 0.0, 0
  for text in texts:
    ids = np.append(tokenizer.encode(text), 1)  # eos
    for start in range(0, len(ids), length):
      piece = ids[start:start + length]
      inputs = np.concatenate([[0], piece[:-1]]).astype(np.int32)  # the start token, then the piece
      log_probs = np.asarray(jax.nn.log_softmax(logits(model, inputs[None]), axis=-1))[0]
      nats -= sum(log_probs[t, piece[t]] for t in range(len(piece)))
      tokens += len(piece)
  assert tokens > 3 * length  # one paragraph spans several rows
  assert main(["eval", "--workdir", str(trainer.workdir), "--text-file", str(path)]) == 0
  num_bytes = sum(len(text.encode("utf-8")) for text in texts)
  assert f"({tokens} tokens, {num_bytes} bytes)" in capsys.readouterr().out
  result = evaluation.evaluate_documents(trainer, tokenizer, texts)
  assert result["tokens"] == tokens and result["bytes"] == num_bytes
  assert result["loss"] == pytest.approx(nats / tokens, rel=1e-4)
  assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-4)


def test_split_bits_per_byte_count_each_packed_documents_bytes(trained, monkeypatch):
  """A hand-packed batch: its documents' nats, each scored alone, over their UTF-8 bytes (one multi-byte)."""
  trainer, model, tokenizer = trained
  texts = ["Emma was handsome, clever, and rich.", "She smiled.", "Mr. Knightley paid a visit — café au lait."]
  length, rows = trainer.config.data.seq_len, trainer.config.data.batch_size
  batch = {name: np.zeros((rows, length), np.int32) for name in ("inputs", "targets", "segments", "positions")}
  weights = np.zeros((rows, length), np.float32)
  nats = 0.0
  # Row 0 holds the first document; row 1 packs the other two; the other rows are padding.
  for row, segment, text in ((0, 1, texts[0]), (1, 1, texts[1]), (1, 2, texts[2])):
    ids = np.concatenate([[0], tokenizer.encode(text), [1]]).astype(np.int32)  # start token, text, eos
    start = int(np.count_nonzero(batch["segments"][row]))
    span = slice(start, start + len(ids) - 1)
    batch["inputs"][row, span], batch["targets"][row, span] = ids[:-1], ids[1:]
    batch["segments"][row, span], batch["positions"][row, span] = segment, np.arange(len(ids) - 1)
    weights[row, span] = 1.0
    log_probs = np.asarray(jax.nn.log_softmax(logits(model, ids[None, :-1]), axis=-1))[0]
    nats -= sum(log_probs[t, ids[t + 1]] for t in range(len(ids) - 1))
  packed = {"decoder_input_tokens": batch["inputs"], "decoder_target_tokens": batch["targets"],
            "decoder_loss_weights": weights, "decoder_segment_ids": batch["segments"],
            "decoder_positions": batch["positions"]}
  monkeypatch.setattr(trainer, "loader", lambda split: iter([{f: packed[f] for f in trainer.features}]))
  result = evaluation.evaluate_split(trainer, tokenizer, "validation", num_batches=1)
  num_bytes = sum(len(text.encode("utf-8")) for text in texts)
  assert num_bytes == sum(len(text) for text in texts) + 3  # the dash takes 3 bytes, the accent 2
  assert result["bytes"] == num_bytes and result["tokens"] == weights.sum()
  assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-4)


def test_split_figures_of_an_encoder_score_its_masked_tokens(tmp_path):
  """An MLM run's validation batch: the loss over the masked positions, from the model's own logits,
  and their targets' bytes."""
  config = load_config(str(pathlib.Path(EXPERIMENT).with_name("encoder_tiny.py")))
  apply_overrides(config, [flag for flag in TINY if "num_kv_heads" not in flag])
  trainer, tokenizer = Trainer(config, tmp_path), load_tokenizer(config.data.tokenizer)
  batch = next(trainer.loader("validation"))
  result = evaluation.evaluate_split(trainer, tokenizer, "validation", num_batches=1)
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  with jax.set_mesh(trainer.mesh):
    log_probs = np.asarray(jax.nn.log_softmax(model(
        batch["encoder_input_tokens"], segment_ids=batch["encoder_segment_ids"],
        positions=batch["encoder_positions"]), axis=-1))
  scored = batch["encoder_loss_weights"] > 0
  targets = batch["encoder_target_tokens"][scored]
  assert result["tokens"] == scored.sum() > 0
  assert result["loss"] == pytest.approx(-np.mean(log_probs[scored, targets]), rel=1e-4)
  assert result["bytes"] == tokenizer.byte_lengths[targets].sum() > 0  # byte_lengths: test_tokenizer.py


def test_a_character_cut_between_rows_counts_its_bytes_once(trained):
  """Byte-fallback pieces of one character split over two rows (a long document's chunks)."""
  _, _, tokenizer = trained
  text = "Café 日本語, naïve"
  ids = tokenizer.encode(text)
  assert len(ids) > len(text)  # byte fallback: some characters take several ids
  for cut in range(1, len(ids)):
    targets = np.zeros((2, len(ids)), np.int32)
    targets[0, :cut], targets[1, :len(ids) - cut] = ids[:cut], ids[cut:]
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.float32),
             "decoder_segment_ids": (targets > 0).astype(np.int32)}
    assert evaluation._target_bytes(tokenizer, batch, "decoder") == len(text.encode("utf-8")), cut


def test_span_corruption_targets_count_the_dropped_text_not_the_sentinels(trained):
  _, _, tokenizer = trained
  spans = [tokenizer.encode(" handsome"), tokenizer.encode(" rich")]
  targets = np.concatenate([[tokenizer.sentinel_id(0)], spans[0], [tokenizer.sentinel_id(1)], spans[1], [1]])
  batch = {"decoder_target_tokens": targets[None], "decoder_loss_weights": np.ones((1, len(targets))),
           "decoder_segment_ids": np.ones((1, len(targets)), np.int32)}
  text = tokenizer.decode(np.concatenate(spans))
  assert text == " handsome rich"
  assert evaluation._target_bytes(tokenizer, batch, "decoder") == len(text)


def test_eval_command_on_split_and_held_out_text(trained, run_dir, capsys):
  trainer, _, tokenizer = trained
  assert main(["eval", "--workdir", str(run_dir), "--batches", "2"]) == 0
  split = evaluation.evaluate_split(trainer, tokenizer, "validation", num_batches=2)
  assert capsys.readouterr().out.strip().endswith(
      f"validation split (2 batches): loss {split['loss']:.4f}, perplexity {split['perplexity']:.2f}, bits per byte "
      f"{split['bits_per_byte']:.4f}, token accuracy {split['accuracy']:.3f} ({int(split['tokens'])} tokens, "
      f"{split['bytes']} bytes)")
  assert main(["eval", "--workdir", str(run_dir), "--text-file",
               str(pathlib.Path(evaluation.__file__).parent / "data" / "corpora" / "austen" / "persuasion.txt")]) == 0
  assert capsys.readouterr().out.count("bits per byte") == 1


def test_evaluating_more_batches_than_the_split_holds_is_named(trained, run_dir, caplog):
  trainer, _, _ = trained
  rows = trainer.loader("validation").rows_in_one_pass(limit=10 ** 6)
  batches = rows // trainer.config.data.batch_size
  assert trainer.split_too_small("validation", batches, "--batches") is None
  with caplog.at_level(logging.WARNING):
    assert main(["eval", "--workdir", str(run_dir), "--batches", str(batches + 1)]) == 0
  assert (f"--batches={batches + 1} batches take {(batches + 1) * trainer.config.data.batch_size} rows of the "
          f"validation split on this process, which has {rows}") in caplog.text


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_option_log_likelihoods_match_single_sequences(trained, prefix_lm):
  _, model, tokenizer = trained
  prompt, options = "She was", [" very happy.", " not", " gone to Bath with Anne and her father."]
  scores = evaluation.option_log_likelihoods(model, tokenizer, prompt, options, prefix_lm=prefix_lm)
  prompt_ids = [0] + tokenizer.encode(prompt).tolist()
  for (total, count), option in zip(scores, options):
    sequence = prompt_ids + tokenizer.encode(option).tolist()
    # A prefix LM reads the start token and the prompt both ways.
    prefix = np.arange(len(sequence))[None, :] < (len(prompt_ids) if prefix_lm else 0)
    log_probs = np.asarray(jax.nn.log_softmax(prefix_logits(model, np.array([sequence], np.int32), prefix)))[0]
    expected = sum(log_probs[t - 1, sequence[t]] for t in range(len(prompt_ids), len(sequence)))
    assert count == len(sequence) - len(prompt_ids)
    assert total == pytest.approx(expected, abs=1e-4)


def test_scoring_hands_back_each_positions_log_probability_only(trained, monkeypatch):
  """Not the [options, width, vocab] distribution, nor (nnx.jit's default) a copy of the parameters;
  and scoring goes through that compiled call, not the model op by op."""
  _, model, tokenizer = trained
  tokens = np.zeros((3, evaluation.WIDTH_BUCKET), np.int32)
  compiled = evaluation._next_token_log_probs.lower(model, tokens, tokens, None).compile()
  assert compiled.memory_analysis().output_size_in_bytes == 3 * (evaluation.WIDTH_BUCKET - 1) * 4  # float32
  shapes, compiled_call = [], evaluation._next_token_log_probs

  def recording(model, tokens, *rest):
    shapes.append(tokens.shape)
    return compiled_call(model, tokens, *rest)

  monkeypatch.setattr(evaluation, "_next_token_log_probs", recording)
  evaluation.option_log_likelihoods(model, tokenizer, "She was", [" very happy.", " not", " gone."])
  assert shapes == [(3, evaluation.WIDTH_BUCKET)]


def test_scoring_with_dropout_on_is_refused(trained):
  """Eager or compiled, dropout drew a new mask each call: the scores were random."""
  trainer, _, tokenizer = trained
  training = build_model(trainer.model_config.replace(dropout_rate=0.1))
  with pytest.raises(ConfigError, match=r"training mode, with dropout on: call model.eval\(\)"):
    evaluation.option_log_likelihoods(training, tokenizer, "She was", [" very happy."])


def test_option_log_likelihoods_refuse_options_past_a_learned_position_table(trained):
  trainer, _, tokenizer = trained
  model = build_model(trainer.model_config.replace(position="learned", max_len=4))
  with pytest.raises(ConfigError, match="a prompt with its option: .* exceeds model.max_len=4"):
    evaluation.option_log_likelihoods(model, tokenizer, "She was", [" very happy."])
  items = [{"context": "She", "options": [" was", " is"], "answer": 0}] * 2
  items.append({"context": "She was very", "options": [" happy.", " sad."], "answer": 0})
  assert evaluation.few_shot_score(model, tokenizer, items[:2], shots=0)["items"] == 2  # these fit
  with pytest.raises(ConfigError, match=r"item 3 with 0 shot\(s\): a prompt with its option: .* exceeds model.max_len"):
    evaluation.few_shot_score(model, tokenizer, items, shots=0)


def test_sentence_completion_task_and_score_command(run_dir, trained, tmp_path):
  paragraphs = [f"Sentence number {i} is here and ending {i} goes on a while. Short one." for i in range(20)]
  items = evaluation.sentence_completion_task(paragraphs, size=10, seed=1)
  assert items == evaluation.sentence_completion_task(paragraphs, size=10, seed=1)
  for item in items:
    number = item["context"].split()[2]
    assert item["context"] == f"Sentence number {number} is here and"
    assert item["options"][item["answer"]] == f" ending {number} goes on a while."
    assert len(set(item["options"])) == 4, "distractors are other sentences' endings"
  task = tmp_path / "task.jsonl"
  task.write_text("".join(json.dumps(item) + "\n" for item in items))
  report_file = tmp_path / "report.json"
  assert main(["score", "--workdir", str(run_dir), "--task", str(task), "--shots", "1",
               "--output", str(report_file)]) == 0
  report = json.loads(report_file.read_text())
  assert report["items"] == 10 and report["chance"] == 0.25
  _, model, tokenizer = trained  # the command scores with the run's model, one shot, seed 0
  assert report == {**evaluation.few_shot_score(model, tokenizer, items, shots=1, seed=0),
                    "task": str(task), "workdir": str(run_dir)}
  assert main(["score", "--workdir", str(run_dir), "--task", str(task), "--items", "4", "--output",
               str(report_file)]) == 0
  assert json.loads(report_file.read_text())["items"] == 4  # the file's first four
  # The built-in task: sentences of the run's own validation split, drawn with --seed.
  assert main(["score", "--workdir", str(run_dir), "--task", "austen_sentence_completion", "--items", "3",
               "--seed", "2", "--output", str(report_file)]) == 0
  trainer = trained[0]
  source = sources.open_split("austen", "validation", ("text",), trainer.config.data.data_dir)
  built_in = evaluation.sentence_completion_task([source[i]["text"].decode("utf-8") for i in range(len(source))],
                                                 size=3, seed=2)
  assert json.loads(report_file.read_text()) == {
      **evaluation.few_shot_score(model, tokenizer, built_in, shots=0, seed=2),
      "task": "austen_sentence_completion", "workdir": str(run_dir)}


def test_sentence_completion_options_are_distinct_in_a_text_that_repeats_itself():
  """Half the sentences repeat one of three, so most draws would offer a repeated ending twice or as
  a distractor: every item still has exactly one true option and distinct distractors."""
  repeated = [f"The same old sentence number {i % 3} ends the very same way." for i in range(60)]
  paragraphs = repeated + [f"Sentence number {i} is here and ending {i} goes on a while." for i in range(60)]
  items = evaluation.sentence_completion_task(paragraphs, size=40, seed=0)
  for item in items:
    assert len(set(item["options"])) == 4
  too_few = [f"The same old sentence number {i % 3} ends the very same way." for i in range(30)]
  with pytest.raises(ConfigError, match="fewer than 3 distinct sentence endings"):
    evaluation.sentence_completion_task(too_few, size=10, seed=0)


class BigramModel(nnx.Module):
  """A stub decoder whose next token depends on the current one only: log p(w | v) = log_softmax(W[v])[w]."""

  config = ModelConfig(arch="decoder", max_len=512)

  def __init__(self, vocab_size: int):
    table = np.random.default_rng(1).normal(0.0, 2.0, (vocab_size, vocab_size))
    self.weights = nnx.Param(jnp.asarray(table, jnp.float32))  # on the device once: vocab x vocab is 256 MB

  def __call__(self, tokens, segment_ids=None):
    return self.weights[...][tokens]


def test_few_shot_score_ranks_options_by_each_rule(trained):
  """Against a hand count with a bigram model: an option's log-likelihood is its first token's
  given the prompt's last token, then each token's given the one before; calibration subtracts
  the same given the start token alone, leaving the first token's two terms."""
  _, _, tokenizer = trained
  endings = [" Anne.", " a long walk to Uppercross with Mary and Charles.", " yes.", " Bath, in the rain.",
             " Captain Wentworth and the Musgroves.", " no.", " Lady Russell, who said nothing at all."]
  model = BigramModel(tokenizer.vocab_size)
  log_p = np.asarray(jax.nn.log_softmax(model.weights[...], axis=-1))  # float32 values, as scored
  rng = np.random.default_rng(0)
  contexts = [f"Item {i} was" for i in range(12)]
  # Each few-shot prompt ends with its item's context, tokenized to the same last token.
  assert all(tokenizer.encode(f"Anne.\n\n{c}").tolist()[-1] == tokenizer.encode(c).tolist()[-1] for c in contexts)

  def rule_scores(context, options):
    last, scores = tokenizer.encode(context).tolist()[-1], {"sum": [], "per_token": [], "calibrated": []}
    for option in options:
      ids = tokenizer.encode(option).tolist()
      rest = sum(log_p[a, b] for a, b in zip(ids, ids[1:]))
      scores["sum"].append(log_p[last, ids[0]] + rest)
      scores["per_token"].append((log_p[last, ids[0]] + rest) / len(ids))
      scores["calibrated"].append(log_p[last, ids[0]] - log_p[0, ids[0]])  # 0: the start token
    return scores

  items = []
  answering = ["sum"] * 6 + ["per_token"] * 4 + ["calibrated"] * 2  # so that the rules score apart
  for context, rule in zip(contexts, answering):
    options = [endings[j] for j in rng.choice(len(endings), 3, replace=False)]
    answer = np.argmax(rule_scores(context, options)[rule])
    items.append({"context": context, "options": options, "answer": int(answer)})
  expected = {"sum": 0, "per_token": 0, "calibrated": 0}
  for item in items:
    for rule, scores in rule_scores(item["context"], item["options"]).items():
      expected[rule] += int(np.argmax(scores) == item["answer"])
  report = evaluation.few_shot_score(model, tokenizer, items, shots=1)
  assert report["accuracy"] == expected["sum"] / len(items)
  assert report["accuracy_per_token"] == expected["per_token"] / len(items)
  assert report["accuracy_calibrated"] == expected["calibrated"] / len(items)
  assert len(set(expected.values())) == 3, "the items should tell the rules apart"
  assert evaluation.few_shot_score(model, tokenizer, items[:3], shots=5)["shots"] == 2  # the other items, at most


def test_few_shot_prompts_are_other_items_with_their_right_answers_then_the_item(monkeypatch):
  items = [{"context": f"Item {i}:", "options": [f" a{i}", f" b{i}", f" c{i}"], "answer": i % 3} for i in range(6)]
  prompts = []

  def record(model, tokenizer, prompt, options, prefix_lm=False):  # the scores themselves do not matter here
    if prompt:  # "": the options' priors, for calibration
      prompts.append(prompt)
    return [(0.0, 1)] * len(options)

  monkeypatch.setattr(evaluation, "option_log_likelihoods", record)
  decoder = build_model(ModelConfig(vocab_size=16, emb_dim=8, num_heads=1, mlp_dim=8, num_layers=1))
  evaluation.few_shot_score(decoder, None, items, shots=3, seed=1)
  assert len(prompts) == len(items)
  for item, prompt in zip(items, prompts):
    *shots, last = prompt.split("\n\n")
    assert last == item["context"] and len(set(shots)) == 3
    answered = {other["context"] + other["options"][other["answer"]] for other in items if other is not item}
    assert set(shots) <= answered  # never the item itself, never a wrong option
  # Every option scores the same here: each rule gives each item a third, not the first option all.
  report = evaluation.few_shot_score(decoder, None, [dict(item, answer=1) for item in items], shots=3)
  assert report["accuracy"] == report["accuracy_per_token"] == report["accuracy_calibrated"] == pytest.approx(1 / 3)


def test_few_shot_scoring_refuses_no_items_and_scores_that_are_not_finite(monkeypatch):
  """An empty task divided by zero items; a NaN score matched no option and divided by zero ties."""
  decoder = build_model(ModelConfig(vocab_size=16, emb_dim=8, num_heads=1, mlp_dim=8, num_layers=1))
  with pytest.raises(ConfigError, match="got no items"):
    evaluation.few_shot_score(decoder, None, [], shots=0)
  monkeypatch.setattr(evaluation, "option_log_likelihoods", lambda model, tokenizer, prompt, options, prefix_lm=False:
                      [(float("nan"), 1)] * len(options))
  with pytest.raises(ConfigError, match="item 1's option log-likelihoods are not finite"):
    evaluation.few_shot_score(decoder, None, [{"context": "a", "options": ["b", "c"], "answer": 0}], shots=0)


def test_bits_per_byte_of_targets_holding_no_text_is_nan_not_nats():
  """Sentinels and eos stand for no bytes: dividing by a floor of 1 byte reported nats / ln 2."""
  summary = evaluation._summary({"loss": 6.0, "cross_entropy": 6.0, "weight": 3.0}, 0)
  assert summary["loss"] == 2.0 and math.isnan(summary["bits_per_byte"])
  assert evaluation._summary({"loss": 6.0, "cross_entropy": 6.0, "weight": 3.0}, 4)["bits_per_byte"] == pytest.approx(
      6.0 / math.log(2) / 4)


def test_bad_task_files_name_the_line(tmp_path):
  task = tmp_path / "task.jsonl"
  task.write_text('{"context": "a", "options": ["b", "c"], "answer": 1}\n{"context": "a", "options": ["b"]}\n')
  with pytest.raises(ConfigError, match="line 2: missing field"):
    evaluation.read_task(task)
  task.write_text('{"context": "a", "options": ["b", "c"], "answer": 3}\n')
  with pytest.raises(ConfigError, match="line 1: answer 3"):
    evaluation.read_task(task)
  for line, message in (('{"context": "a", "options": ["b", "c"], "answer": "0"}', "line 1: answer '0' is not an "),
                        ('{"context": "a", "options": "bc", "answer": 0}', "line 1: context must be a string and "
                                                                         "options a list of 2 or more strings"),
                        ('{"context": "a", "options": ["b"], "answer": 0}', "options a list of 2 or more strings"),
                        ('{"context": "a", "options": ["b"]', "line 1: not valid JSON"),
                        ('{"context": "a", "options": ["b", ""], "answer": 0}', "line 1: option 1 is empty"),
                        ('{"context": "a", "options": ["b", "c", "b"], "answer": 0}',
                         "line 1: option 'b' is given twice"),
                        ('["a"]', "line 1: a JSONL record must be a JSON object, got list"),
                        ('{"options": ["b", "c"]}', r"line 1: missing field\(s\) \['answer', 'context'\]")):
    task.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
      evaluation.read_task(task)
  task.write_bytes(b'{"context": "caf\xe9", "options": ["b"], "answer": 0}\n')
  with pytest.raises(ConfigError, match=r"line 1, column \d+: byte 0xe9 is not UTF-8"):
    evaluation.read_task(task)


def test_a_sample_prompt_its_position_table_cannot_hold_stops_train_before_training(tmp_path, capsys):
  long_prompt = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home " * 3
  assert main(["train", "--config", EXPERIMENT, "--workdir", str(tmp_path), *TINY, "--config.model.position=learned",
               "--config.model.max_len=32", "--sample-prompt", long_prompt]) == 2
  assert "exceeds model.max_len=32 of the learned position table" in capsys.readouterr().err
  assert not (tmp_path / "checkpoints").exists()


def test_a_run_whose_tokenizer_file_was_replaced_is_refused_by_training_inference_and_init_from(
    run_dir, tmp_path, capsys):
  run = shutil.copytree(run_dir, tmp_path / "run")
  shutil.copy(SHIPPED["austen_bpe_8k"], tmp_path / "tok.model")
  config = json.loads((run / "config.json").read_text())
  config["data"]["tokenizer"] = str(tmp_path / "tok.model")  # the same file, by another path
  (run / "config.json").write_text(json.dumps(config))
  assert Trainer.from_workdir(run)
  (tmp_path / "text.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n" * 40)
  train_tokenizer([tmp_path / "text.txt"], 400, tmp_path / "tok", overwrite=True)
  assert main(["decode", "--workdir", str(run), "--prompt", "Emma"]) == 2
  assert main(["train", "--config", EXPERIMENT, "--workdir", str(run), *TINY, "--config.train.steps=8",
               f"--config.data.tokenizer={tmp_path / 'tok.model'}"]) == 2  # resuming, as decoding
  assert capsys.readouterr().err.count("tok.model' is not the file") == 2
  # A new run may not start from its parameters either: each embedding row would stand for another piece.
  config = json.loads((run_dir / "config.json").read_text())
  config["data"]["tokenizer"] = str(tmp_path / "tok.model")
  with pytest.raises(ConfigError, match="was trained with another tokenizer than data.tokenizer="):
    Trainer(ml_collections.ConfigDict(config), tmp_path / "tuned").init_params_from(run_dir)


def test_a_run_trained_with_relative_paths_is_read_from_another_directory(tmp_path, monkeypatch, capsys):
  """config.json names the data and tokenizer files absolutely; a resume in the same directory takes a
  position saved with the relative names, as runs from before saved them."""
  (tmp_path / "train_here").mkdir()
  shutil.copy(SHIPPED["austen_bpe_8k"], tmp_path / "train_here" / "tok.model")
  (tmp_path / "train_here" / "text.txt").write_text("\n\n".join(
      f"Paragraph {i}: Emma Woodhouse, handsome, clever, and rich." for i in range(300)) + "\n")
  monkeypatch.chdir(tmp_path / "train_here")
  assert main(["train", "--config", EXPERIMENT, "--workdir", "run", *TINY, "--config.data.dataset=text.txt",
               "--config.data.tokenizer=tok.model", "--config.train.steps=2", "--config.train.checkpoint_every=2",
               "--config.data.data_dir=built"]) == 0
  data = json.loads(pathlib.Path("run/config.json").read_text())["data"]
  assert (data["dataset"], data["tokenizer"], data["data_dir"]) == (
      str(tmp_path / "train_here" / "text.txt"), str(tmp_path / "train_here" / "tok.model"),
      str(tmp_path / "train_here" / "built"))
  config = load_config(EXPERIMENT)
  apply_overrides(config, TINY + ["--config.data.dataset=text.txt", "--config.data.tokenizer=tok.model",
                                  "--config.data.data_dir=built"])
  older = make_loader(config.data, "train").get_state()  # the names as given: relative, as older runs saved them
  make_loader(Trainer.from_workdir("run").config.data, "train").set_state(older)
  monkeypatch.chdir(tmp_path)
  assert main(["eval", "--workdir", "train_here/run", "--batches", "1"]) == 0
  assert "validation split (1 batches): loss" in capsys.readouterr().out
  assert not (tmp_path / "built").exists()  # the datasets built in train_here were read, not built again here


def test_a_diverging_run_is_a_one_line_error(tmp_path, capsys):
  assert main(["train", "--config", EXPERIMENT, "--workdir", str(tmp_path), *TINY,
               "--config.train.optimizer.learning_rate=1e39", "--config.train.optimizer.schedule=constant"]) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert re.match(r"t5x-like train: error: .*non-finite.* Lower train.optimizer.learning_rate", err.splitlines()[-1])


def test_a_preempted_run_exits_as_sigterm_does_saying_how_to_resume(monkeypatch, capsys):
  def preempted(args, overrides):
    raise Preempted("stopped by SIGTERM after step 7, whose checkpoint is saved; rerun the same command to resume")
  monkeypatch.setattr(cli, "_train", preempted)
  assert main(["train", "--config", EXPERIMENT, "--workdir", "unused"]) == 128 + 15
  assert capsys.readouterr().err == ("t5x-like train: stopped by SIGTERM after step 7, whose checkpoint is saved; "
                                     "rerun the same command to resume\n")


@pytest.mark.parametrize("message", [
    "INTERNAL: Error dispatching computation: Out of memory allocating 9 bytes.",  # XLA:CPU
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm.",
    "RESOURCE_EXHAUSTED: Failed to allocate request for 32.00GiB on device ordinal 0",  # a GPU's allocator
])
def test_out_of_memory_is_a_one_line_error_saying_what_to_lower(message, monkeypatch, capsys):
  def allocate(args, overrides):
    raise jax.errors.JaxRuntimeError(message)
  monkeypatch.setattr(cli, "_decode", allocate)
  assert main(["decode", "--workdir", "unused", "--prompt", "Emma"]) == 1
  assert capsys.readouterr().err == (f"t5x-like decode: error: out of memory (JaxRuntimeError: {message}); lower "
                                     f"--max-new-tokens, --num-beams or the number of prompts\n")
  def crash(args, overrides):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")
  monkeypatch.setattr(cli, "_decode", crash)
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):  # not hidden behind a one-liner
    main(["decode", "--workdir", "unused", "--prompt", "Emma"])


@pytest.mark.parametrize("arguments, message", [
    (["decode", "--input", "{prompts}"], r'prompts\.jsonl, line 2: no string "prompt" field'),
    (["score", "--items", "0"], "0 is below 1"),
    (["score", "--shots", "-1"], "-1 is below 0"),
    (["eval", "--batches", "0"], "0 is below 1"),
    (["eval", "--text-file", "{prompts}", "--split", "train"], "--text-file scores the whole file"),
    (["decode", "--prompt", "Emma", "--output", "{tmp}/no/such/dir/out.jsonl"], "its directory does not exist"),
    (["score", "--output", "{tmp}"], "is a directory or"),
])
def test_bad_command_arguments_are_one_line_errors(arguments, message, run_dir, tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "Emma"}\n{"text": "no prompt"}\n')
  arguments = [a.format(prompts=prompts, tmp=tmp_path) for a in arguments]
  try:
    code = main([arguments[0], "--workdir", str(run_dir), *arguments[1:]])
  except SystemExit as exit:  # argparse's own refusals
    code = exit.code
  assert code == 2
  assert re.search(message, capsys.readouterr().err)
