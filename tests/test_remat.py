"""Rematerialisation changes memory, not results: every family and mode equals no remat."""
import jax
import numpy as np
import pytest

from frlora_jax import causal_lm, experiment, lora, models, remat


def _models():
  yield "bert", models.random_classifier("bert", hidden=32, layers=2, heads=2, vocab=50, max_positions=40,
                                         intermediate=64, initializer_range=0.2)
  yield "roberta", models.random_classifier("roberta", hidden=32, layers=2, heads=2, vocab=50, max_positions=40,
                                            intermediate=64, initializer_range=0.2)
  yield "llama", causal_lm.random_causal_lm("llama", hidden=32, layers=2, heads=4, kv_heads=2, vocab=50,
                                            max_positions=64, initializer_range=0.2)
  yield "gpt2", causal_lm.random_causal_lm("gpt2", hidden=32, layers=2, heads=4, vocab=50, max_positions=64,
                                           initializer_range=0.2)


def _loss_and_grads(model, mode):
  apply = (causal_lm.make_apply if model.family in ("llama", "gpt2") else models.make_apply)(model)
  apply = remat.with_remat(apply, model.family, mode)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 50, size=(2, 12)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  base, head = lora.split_tree(model.params, model.head_patterns)
  targets = lora.find_targets(base, ["query", "value", "q_proj", "v_proj", "c_attn"])
  lora_tree = lora.init_kaiming(jax.random.PRNGKey(0), targets, 4)
  lora_tree = lora.map_lora(lambda e: {"a": e["a"], "b": e["b"] + 0.1}, lora_tree)

  def loss(trainable):
    params = lora.join_trees(base, trainable["head"])
    with lora.interceptor(trainable["lora"], 2.0, 0.1, jax.random.PRNGKey(3)):
      out = apply(params, batch, jax.random.PRNGKey(1), deterministic=False)  # dropout on: same masks needed
    return (out.astype(np.float32) ** 2).mean()

  return jax.jit(jax.value_and_grad(loss))({"lora": lora_tree, "head": head})


@pytest.mark.parametrize("family, model", list(_models()), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("mode", ["block", "full", "dots_saveable"])
def test_remat_equals_no_remat(family, model, mode):
  loss, grads = _loss_and_grads(model, "none")
  loss_r, grads_r = _loss_and_grads(model, mode)
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)  # fusion-order rounding


def test_block_remat_is_really_in_the_program():
  """The backward pass of a block-rematted model recomputes: its jaxpr holds checkpoint (remat) equations."""
  model = dict(_models())["llama"]
  apply = remat.with_remat(causal_lm.make_apply(model), "llama", "block")
  ids = np.ones((1, 8), np.int32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: apply(p, {"input_ids": ids, "attention_mask": ids}).sum()))(model.params)
  assert str(jaxpr).count("checkpoint") + str(jaxpr).count("remat") >= model.hf_config.num_hidden_layers


def test_remat_through_a_federated_round(make_config):
  records = {}
  for mode in ("none", "block"):
    exp = experiment.build(make_config(**{"model.remat": mode}))
    records[mode] = experiment.run_round(exp, exp.init_state(), 0)[1]["client_losses"]
  np.testing.assert_allclose(records["block"], records["none"], rtol=1e-5)


def test_unknown_remat_is_refused(make_config):
  with pytest.raises(ValueError, match=r"config.model.remat='blocks' is unknown; use one of none, block, full"):
    experiment.build(make_config(**{"model.remat": "blocks"}))
