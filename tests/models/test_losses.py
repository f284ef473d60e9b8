"""Cross-entropy sums against a numpy reference, z-loss included; the chunked kernel against
explicit logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import project
from models.losses import chunked_cross_entropy_sums, cross_entropy_sums


def test_sums_match_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.uniform(0, 2, (2, 5)) * (rng.random((2, 5)) > 0.3)).astype(np.float32)  # some 0, none 1
  sums = cross_entropy_sums(logits, targets, weights, z_loss=1e-2)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  assert float(sums["cross_entropy"]) == pytest.approx(float((nll * weights).sum()), rel=1e-5)
  assert float(sums["z_loss"]) == pytest.approx(float((1e-2 * log_z**2 * weights).sum()), rel=1e-5)
  assert float(sums["loss"]) == pytest.approx(float(sums["cross_entropy"] + sums["z_loss"]), rel=1e-6)
  assert float(sums["correct"]) == float(((logits.argmax(-1) == targets) * weights).sum())
  assert float(sums["weight"]) == float(weights.sum())


def test_uniform_logits_give_log_vocab():
  sums = cross_entropy_sums(np.zeros((1, 3, 10), np.float32), np.zeros((1, 3), int), np.ones((1, 3)))
  assert float(sums["cross_entropy"]) / 3 == pytest.approx(np.log(10))


def test_a_target_tied_for_the_top_counts_as_a_random_tie_break_would():
  logits = np.array([[[0.0, 2.0, 1.0], [3.0, 3.0, 0.0], [1.0, 0.0, 5.0], [4.0, 4.0, 4.0]]], np.float32)
  targets = np.array([[1, 1, 0, 2]])  # the top; tied with one other; below the top; tied with two others
  sums = cross_entropy_sums(logits, targets, np.ones((1, 4), np.float32))
  assert float(sums["correct"]) == pytest.approx(1 + 1 / 2 + 0 + 1 / 3)
  # A model whose logits are all equal (a collapsed run) scores chance, 1 / vocab, in both kernels.
  vocab, weights = 37, np.ones((3, 11), np.float32)
  table = jax.random.normal(jax.random.key(0), (vocab, 16))
  collapsed = chunked_cross_entropy_sums(jnp.zeros((3, 11, 16)), table, jnp.zeros((3, 11), jnp.int32), weights,
                                         table_in_dim=1, chunk_tokens=6)
  assert float(collapsed["correct"]) == pytest.approx(weights.sum() / vocab)


def _projection_case(table_in_dim, length=11, vocab=37, dim=16):
  keys = jax.random.split(jax.random.key(table_in_dim), 5)
  hidden = jax.random.normal(keys[0], (3, length, dim))
  table = jax.random.normal(keys[1], (vocab, dim) if table_in_dim == 1 else (dim, vocab)) * 0.5
  bias = jax.random.normal(keys[2], (vocab,))
  targets = jax.random.randint(keys[3], (3, length), 0, vocab)
  weights = (jax.random.uniform(keys[4], (3, length)) > 0.25).astype(jnp.float32)
  return hidden, table, bias, targets, weights


def _logits(hidden, table, bias, table_in_dim, bf16_inputs=False):
  flat = hidden.reshape(-1, hidden.shape[-1])
  logits = project(flat, table, kernel_in_dim=table_in_dim, bf16_inputs=bf16_inputs) + bias
  return logits.reshape(*hidden.shape[:2], -1)


@pytest.mark.parametrize("table_in_dim", [0, 1])
def test_chunked_loss_and_gradients_match_the_logits_path(table_in_dim):
  # Six chunks of two positions, the last one padded (11 positions): the sums and the
  # gradients of `loss` must equal those of cross_entropy_sums over explicit logits.
  hidden, table, bias, targets, weights = _projection_case(table_in_dim)
  z_loss = 0.05

  def reference(hidden, table, bias):
    return cross_entropy_sums(_logits(hidden, table, bias, table_in_dim), targets, weights, z_loss)

  def chunked(hidden, table, bias):
    return chunked_cross_entropy_sums(hidden, table, targets, weights, z_loss, table_in_dim=table_in_dim,
                                      bias=bias, chunk_tokens=6)

  expected, got = jax.jit(reference)(hidden, table, bias), jax.jit(chunked)(hidden, table, bias)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, err_msg=name)
  loss = lambda f: jax.jit(jax.grad(lambda *a: f(*a)["loss"], argnums=(0, 1, 2)))  # noqa: E731
  for got_grad, expected_grad in zip(loss(chunked)(hidden, table, bias), loss(reference)(hidden, table, bias)):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_chunked_loss_rounds_matmul_inputs_as_the_bf16_projection_does():
  hidden, table, bias, targets, weights = _projection_case(1, vocab=512, dim=64)

  def reference(hidden, table):
    return cross_entropy_sums(_logits(hidden, table, 0.0, 1, bf16_inputs=True), targets, weights)["loss"]

  def chunked(hidden, table):
    return chunked_cross_entropy_sums(hidden, table, targets, weights, table_in_dim=1, bf16_inputs=True,
                                      chunk_tokens=9)["loss"]

  exact = cross_entropy_sums(_logits(hidden, table, 0.0, 1), targets, weights)["loss"]
  got, expected = jax.jit(chunked)(hidden, table), jax.jit(reference)(hidden, table)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert abs(float(expected - exact)) > 100 * abs(float(got - expected))  # the rounding is visible
  gradients = jax.grad(chunked, (0, 1))(hidden, table), jax.grad(reference, (0, 1))(hidden, table)
  for got_grad, expected_grad in zip(*gradients):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-3, atol=1e-5)
