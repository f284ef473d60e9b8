"""The cudnn attention kernel's call into jax.nn.dot_product_attention, checked on CPU.

CI has no GPU, so the call runs with implementation="xla" (jax's own kernel, the same
arguments cuDNN gets) against our einsum kernel: this pins the layout, the grouping of
query heads per kv head (GQA) and the mask of packed and padded segments. On a GPU, one
test runs cuDNN itself (run on an H200: docs/performance.md, item 39).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import attention_mask, dot_product_attention, fused_attention
from models.config import ConfigError, ModelConfig

LENGTH = 24


def segments():
  """Row 0: two packed documents; row 1: one document, then 5 padding tokens."""
  first = jnp.where(jnp.arange(LENGTH) < 10, 1, 2)
  second = jnp.where(jnp.arange(LENGTH) < LENGTH - 5, 1, 0)
  return jnp.stack([first, second])


@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_match_our_xla_kernel(causal):
  parts = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(parts[0], (2, LENGTH, 6, 8))
  k = jax.random.normal(parts[1], (2, LENGTH, 2, 8))
  v = jax.random.normal(parts[2], (2, LENGTH, 2, 8))
  cotangent = jax.random.normal(parts[3], q.shape)
  mask = attention_mask(segments(), segments(), causal=causal)
  real = (segments() != 0)[:, :, None, None]  # padding queries see no key: any average will do

  def loss(attend):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent * real), argnums=(0, 1, 2))

  ours = loss(lambda q, k, v: dot_product_attention(q, k, v, mask, None, scale=0.3, kernel="xla"))(q, k, v)
  fused = loss(lambda q, k, v: fused_attention(q, k, v, mask, scale=0.3, causal=causal,
                                               implementation="xla"))(q, k, v)
  for got, expected in zip(jax.tree.leaves(fused), jax.tree.leaves(ours)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on NVIDIA GPUs only")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_on_a_gpu_matches_our_xla_kernel_in_float32(causal):
  """cuDNN itself, in bf16 with head dim 64, against our kernel on the same inputs in float32:
  values and gradients within bf16 rounding, over packed and padded rows."""
  length = 256
  first = jnp.where(jnp.arange(length) < 100, 1, jnp.where(jnp.arange(length) < 180, 2, 3))
  rows = jnp.stack([first, jnp.where(jnp.arange(length) < length - 37, 1, 0)])
  parts = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(part, (2, length, heads, 64)).astype(jnp.bfloat16)
             for part, heads in zip(parts, (8, 2, 2)))
  cotangent = jax.random.normal(parts[3], q.shape) * (rows != 0)[:, :, None, None]
  mask = attention_mask(rows, rows, causal=causal)

  def loss(attend):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent),
                                      argnums=(0, 1, 2)))

  expected = loss(lambda q, k, v: dot_product_attention(q, k, v, mask, None, scale=0.125, kernel="xla"))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  got = loss(lambda q, k, v: fused_attention(q, k, v, mask, scale=0.125, causal=causal))(q, k, v)
  for got_leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    error = np.abs(np.asarray(got_leaf, np.float32) - np.asarray(expected_leaf))
    assert error.max() <= 2e-2 * np.abs(np.asarray(expected_leaf)).max()


def test_cudnn_on_a_cpu_names_the_platform():
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="runs on NVIDIA GPUs only, and this backend is 'cpu'"):
    dot_product_attention(q, q, q, jnp.ones((1, 1, 4, 4), bool), None, scale=1.0, kernel="cudnn")


@pytest.mark.parametrize("fields, message", [
    (dict(dtype="float32"), "takes bfloat16 or float16 operands"),
    (dict(dtype="bfloat16", position="relative"), "'cudnn' takes no attention bias"),
    (dict(dtype="bfloat16", emb_dim=48, num_heads=4), "multiple of 8 and at most 256, got 12"),
    (dict(dtype="bfloat16", emb_dim=512, num_heads=1), "multiple of 8 and at most 256, got 512"),
])
def test_configs_cudnn_cannot_run_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(attention_kernel="cudnn", **fields).validate()
  ModelConfig(attention_kernel="auto", **fields).validate()


def test_cudnn_trains_and_kv_cache_decoding_keeps_xla():
  from flax import nnx

  from models.attention import Attention

  cfg = ModelConfig(emb_dim=32, num_heads=4, dtype="bfloat16", attention_kernel="cudnn")
  attention = Attention(cfg, rope=True, rngs=nnx.Rngs(0))
  assert attention._kernel(None, 512, 512) == "cudnn"
  # A cached step takes the xla kernel: cuDNN, on this CPU, would raise. It writes its slot and
  # attends as the same layer with the xla kernel does.
  xla = Attention(cfg.replace(attention_kernel="xla"), rope=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 1, 32), jnp.bfloat16)
  outs = []
  for layer in (attention, xla):
    cache = {"k": jnp.zeros((1, 4, 8, 8), jnp.bfloat16), "v": jnp.zeros((1, 4, 8, 8), jnp.bfloat16)}
    out, cache = layer(x, mask=jnp.arange(8)[None, None, None] < 1, positions=jnp.zeros((1, 1), jnp.int32),
                       cache=cache, cache_index=jnp.array(0))
    assert bool(jnp.any(cache["k"][:, :, 0] != 0)) and not bool(jnp.any(cache["k"][:, :, 1:] != 0))
    outs.append(np.asarray(out, np.float32))
  np.testing.assert_array_equal(*outs)
  # One key seen, so softmax gives it weight 1 whatever the query: the output is x's value,
  # projected out (each head's value of x, through the output kernel), computed here in float32.
  value = np.einsum("btd,dke->btke", np.asarray(x, np.float32), np.asarray(attention.value.kernel[...], np.float32))
  expected = np.einsum("btke,ked->btd", value, np.asarray(attention.out.kernel[...], np.float32))
  np.testing.assert_allclose(outs[0], expected, rtol=0.05, atol=0.02)  # bfloat16 roundings on the way
  assert np.any(outs[0] != 0)


def test_auto_picks_cudnn_on_a_gpu_where_it_fits(monkeypatch):
  from flax import nnx

  from models.attention import Attention

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  kernel = lambda **fields: Attention(ModelConfig(**fields), rope=True, rngs=nnx.Rngs(0))._kernel  # noqa: E731
  assert kernel(emb_dim=32, num_heads=4, dtype="bfloat16")(None, 512, 512) == "cudnn"
  assert kernel(emb_dim=32, num_heads=4, dtype="bfloat16")(jnp.zeros(()), 512, 512) == "xla"
  assert kernel(emb_dim=32, num_heads=4, dtype="float32")(None, 512, 512) == "xla"
  assert kernel(emb_dim=48, num_heads=4, dtype="bfloat16")(None, 512, 512) == "xla"  # head dim 12


def test_auto_picks_cudnn_only_where_jaxs_own_check_takes_the_call(monkeypatch):
  """Against jax's check_is_flash_attention (which runs without a GPU): our mask reaches cuDNN as
  a bias, and training is the strictest case. An odd length or a head dim past 128 on an A100
  would otherwise fail the step with NotImplementedError."""
  from flax import nnx
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  from models.attention import Attention

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  layers = {head_dim: Attention(ModelConfig(emb_dim=2 * head_dim, num_heads=2, dtype="bfloat16"), rope=True,
                                rngs=nnx.Rngs(0)) for head_dim in (64, 160, 256)}
  for capability in ("9.0", "8.0"):  # an H100, an A100
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda wanted: float(capability) >= float(wanted))
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(compute_capability=capability)])
    for head_dim, attention in layers.items():
      for queries, keys in ((512, 512), (511, 511), (512, 7), (1, 512)):
        shape = lambda length: jax.ShapeDtypeStruct((1, length, 2, head_dim), jnp.bfloat16)  # noqa: E731
        try:
          cudnn.check_is_flash_attention(shape(queries), shape(keys), shape(keys), cudnn.AttentionLayout.BTNH.value,
                                         91000, has_bias=True, is_training=True)
          takes = True
        except NotImplementedError:
          takes = False
        picked = attention._kernel(None, keys, queries)
        assert picked == ("cudnn" if takes else "xla"), (capability, head_dim, queries, keys)
