"""Packed-bit dropout: the rate it claims, unbiasedness, and that it reaches Flax/HF dropouts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frlora_jax import dropout as dropout_lib
from frlora_jax import models


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_keep_mask_drops_at_the_stated_probability(bits, rate):
  n = 1_000_003  # odd, so the last 32-bit word is only partly used
  keep = np.asarray(dropout_lib.keep_mask(jax.random.PRNGKey(3), rate, (n,), bits))
  p = dropout_lib.drop_probability(rate, bits)
  assert abs(p - rate) <= 2.0 ** -(bits + 1)
  assert abs((1.0 - keep.mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)
  # masks from different keys, and neighbouring bytes of one word, disagree as often
  # as independent draws do: 2p(1-p)
  independent = 2 * p * (1 - p)
  other = np.asarray(dropout_lib.keep_mask(jax.random.PRNGKey(4), rate, (n,), bits))
  assert abs((keep != other).mean() - independent) < 0.01
  assert abs((keep[0::4] != keep[1::4]).mean() - independent) < 0.01


@pytest.mark.parametrize("bits", [8, 16])
def test_dropout_is_unbiased_and_masks_shared_axes(bits):
  x = jnp.ones((64, 128, 32))
  y = np.asarray(dropout_lib.dropout(x, 0.1, jax.random.PRNGKey(0), bits))
  assert abs(y.mean() - 1.0) < 0.01
  assert set(np.unique(y)) == {0.0, np.float32(1.0 / (1.0 - dropout_lib.drop_probability(0.1, bits)))}
  shared = np.asarray(dropout_lib.dropout(x, 0.3, jax.random.PRNGKey(0), bits, mask_shape=(64, 128, 1)))
  assert np.all(shared == shared[..., :1])


def test_bad_bits_named():
  with pytest.raises(ValueError, match="bits=12"):
    dropout_lib.keep_mask(jax.random.PRNGKey(0), 0.1, (4,), 12)


class _TwoDropouts(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic):
    x = nn.Dropout(0.5)(x, deterministic=deterministic)
    return nn.Dropout(0.25, broadcast_dims=(-1,))(x, deterministic=deterministic)


def test_interceptor_reroutes_flax_dropout_and_keeps_its_rules():
  x = jnp.ones((256, 64))
  run = lambda det: _TwoDropouts().apply({}, x, det, rngs={"dropout": jax.random.PRNGKey(1)})
  plain = np.asarray(run(False))
  with dropout_lib.interceptor(32):
    assert np.array_equal(np.asarray(run(False)), plain)  # 32 bits is Flax's own dropout, bit for bit
  with dropout_lib.interceptor(8):
    packed = np.asarray(run(False))
    assert np.array_equal(np.asarray(run(True)), np.asarray(x))  # deterministic passes through
    shared = np.asarray(nn.Dropout(0.25, broadcast_dims=(-1,)).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(2)}))
  assert not np.array_equal(packed, plain)
  kept = packed != 0
  assert abs(kept.mean() - (1 - dropout_lib.drop_probability(0.5, 8)) * (1 - dropout_lib.drop_probability(0.25, 8))) < 0.02
  assert abs(packed.mean() - 1.0) < 0.05
  assert np.all(shared == shared[:, :1])  # broadcast_dims=(-1,) shares the mask along the last axis
  assert 0 < (shared[:, 0] == 0).sum() < len(shared)


def test_interceptor_reaches_hf_model_dropouts():
  model = models.random_classifier("bert", hidden=32, layers=2, heads=2, vocab=100, max_positions=16)
  apply = models.make_apply(model)
  ids = jnp.arange(2 * 12).reshape(2, 12) % 97 + 3
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
  key = jax.random.PRNGKey(0)
  train32 = apply(model.params, batch, key, deterministic=False)
  with dropout_lib.interceptor(8):
    train8 = apply(model.params, batch, key, deterministic=False)
    eval8 = apply(model.params, batch)
  assert not np.allclose(train8, train32)
  np.testing.assert_array_equal(eval8, apply(model.params, batch))
