"""LoRA tree: PiSSA leaves the model unchanged, interceptor forward == merged weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frlora_jax import lora, models


@pytest.fixture(scope="module")
def tiny():
  model = models.random_classifier("roberta", hidden=32, layers=2, heads=2, vocab=50, num_labels=3,
                                   max_positions=40, intermediate=64, initializer_range=0.2)
  ids = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 3, 50)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
  return model, models.make_apply(model), batch


def test_targets_by_pattern(tiny):
  model, _, _ = tiny
  targets = lora.find_targets(model.params, ["query", "value"])
  names = [lora.path_str(p) for p in targets]
  assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
  assert lora.find_targets(model.params, [r"attention/self/(query|key|value)$"]).keys() >= targets.keys()


def test_pissa_leaves_logits_unchanged(tiny):
  model, apply, batch = tiny
  targets = lora.find_targets(model.params, ["query", "value"])
  before = apply(model.params, batch)
  lora_tree, residual = lora.init_pissa(model.params, targets, rank=4, scale=2.0)
  with lora.interceptor(lora_tree, 2.0):
    after = apply(residual, batch)
  np.testing.assert_allclose(after, before, atol=1e-5)
  # and the residual alone is a different model (the LoRA branch carries the principal part)
  assert np.abs(np.asarray(apply(residual, batch) - before)).max() > 1e-3


def test_interceptor_equals_merged_kernel_under_jit(tiny):
  model, apply, batch = tiny
  targets = lora.find_targets(model.params, ["query", "value", "dense"])
  tree = lora.init_kaiming(jax.random.PRNGKey(0), targets, rank=3)
  tree = jax.tree_util.tree_map(lambda x: x + 0.05, tree)  # non-zero B

  @jax.jit
  def with_lora(params, tree):
    with lora.interceptor(tree, 1.5):
      return apply(params, batch)

  merged = apply(lora.merge(model.params, tree, 1.5), batch)
  np.testing.assert_allclose(with_lora(model.params, tree), merged, atol=1e-5)


def test_kaiming_init_matches_peft(tiny):
  model, _, _ = tiny
  targets = lora.find_targets(model.params, ["query"])
  entries = lora.lora_entries(lora.init_kaiming(jax.random.PRNGKey(0), targets, rank=4))
  for path, (d_in, d_out) in targets.items():
    a, b = entries[path]["a"], entries[path]["b"]
    assert a.shape == (d_in, 4) and b.shape == (4, d_out)
    assert np.all(np.asarray(b) == 0) and np.abs(a).max() <= 1 / np.sqrt(d_in)


def test_rank_larger_than_target_is_refused(tiny):
  model, _, _ = tiny
  with pytest.raises(ValueError, match="config.lora.rank=64 is larger"):
    lora.check_rank(lora.find_targets(model.params, ["query"]), 64)


@pytest.mark.parametrize("clients, n_in, n_out, r", [(5, 48, 40, 4), (6, 16, 20, 4)])  # K*r below and above in
def test_factors_of_weighted_sum_is_its_truncated_svd(clients, n_in, n_out, r):
  rng = np.random.default_rng(0)
  a_k = rng.normal(size=(clients, n_in, r)).astype(np.float32)
  b_k = rng.normal(size=(clients, r, n_out)).astype(np.float32)
  w = rng.dirichlet(np.ones(clients)).astype(np.float32)
  a, b = (np.asarray(x) for x in lora.factors_of_weighted_sum(jnp.asarray(a_k), jnp.asarray(b_k), jnp.asarray(w), r))
  total = np.einsum("k,kir,kro->io", w, a_k, b_k)
  u, s, vt = np.linalg.svd(total)
  assert a.shape == (n_in, r) and b.shape == (r, n_out)
  np.testing.assert_allclose(a @ b, (u[:, :r] * s[:r]) @ vt[:r], atol=2e-4 * s[0])
  np.testing.assert_allclose(a.T @ a, np.diag(s[:r]), atol=2e-4 * s[0])  # split evenly: A^T A = B B^T = S_r
  np.testing.assert_allclose(b @ b.T, np.diag(s[:r]), atol=2e-4 * s[0])
