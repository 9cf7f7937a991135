"""Scanning Llama's layers changes the compiled program, not results: logits, loss and LoRA
gradients (dropout on, any remat) equal HF's unrolled loop, and the program holds one layer."""
import dataclasses

import jax
import numpy as np
import pytest

from frlora_jax import causal_lm, experiment, lora, remat, scan_layers

LAYERS = 3


def _model(scan: bool, **shape):
  kw = dict(hidden=32, layers=LAYERS, heads=4, kv_heads=2, vocab=50, max_positions=64, initializer_range=0.2)
  kw.update(shape)
  return dataclasses.replace(causal_lm.random_causal_lm("llama", **kw), scan_layers=scan)


def _loss_and_grads(model, mode="none", patterns=("q_proj", "v_proj"), hidden_apply=False):
  apply = (causal_lm.make_hidden_apply if hidden_apply else causal_lm.make_apply)(model)
  apply = remat.with_remat(apply, "llama", mode)
  ids = np.random.default_rng(0).integers(3, 50, size=(2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :3] = 0  # left padding: masks and positions reach every layer
  batch = {"input_ids": ids, "attention_mask": mask}
  base, head = lora.split_tree(model.params, model.head_patterns)
  targets = lora.find_targets(base, list(patterns))
  tree = lora.map_lora(lambda e: {"a": e["a"], "b": e["b"] + 0.1},
                       lora.init_kaiming(jax.random.PRNGKey(0), targets, 4))

  def loss(trainable):
    params = lora.join_trees(base, trainable["head"])
    with lora.interceptor(trainable["lora"], 2.0, 0.1, jax.random.PRNGKey(3)):  # LoRA dropout: same masks needed
      out = apply(params, batch, jax.random.PRNGKey(1), deterministic=False)
    out = out[0] if hidden_apply else out
    return (out.astype(np.float32) ** 2).mean()

  return jax.jit(jax.value_and_grad(loss))({"lora": tree, "head": head})


def _assert_same(scanned, unrolled):
  np.testing.assert_allclose(float(scanned[0]), float(unrolled[0]), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(scanned[1]), jax.tree_util.tree_leaves(unrolled[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)  # fusion-order rounding


@pytest.mark.parametrize("mode", ["none", "block"])
def test_scanned_layers_equal_the_unrolled_loop(mode):
  _assert_same(_loss_and_grads(_model(True), mode), _loss_and_grads(_model(False), mode))


def test_scanned_hidden_states_with_every_projection_targeted():
  patterns = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  _assert_same(_loss_and_grads(_model(True), patterns=patterns, hidden_apply=True),
               _loss_and_grads(_model(False), patterns=patterns, hidden_apply=True))


def test_lora_on_some_layers_only_takes_the_unrolled_loop():
  """Targets on layer 0 alone cannot be stacked: the same numbers as the unrolled loop, not a lost update."""
  _assert_same(_loss_and_grads(_model(True), patterns=(r"layers/0/self_attn/q_proj",)),
               _loss_and_grads(_model(False), patterns=(r"layers/0/self_attn/q_proj",)))


def _jaxpr(model):
  """The jaxpr of a forward pass with LoRA (and its dropout) on q_proj and v_proj of every layer."""
  apply = causal_lm.make_apply(model)
  ids = np.ones((1, 8), np.int32)
  tree = lora.init_kaiming(jax.random.PRNGKey(0), lora.find_targets(model.params, ["q_proj", "v_proj"]), 4)

  def forward(params, tree):
    with lora.interceptor(tree, 2.0, 0.1, jax.random.PRNGKey(3)):
      return apply(params, {"input_ids": ids, "attention_mask": ids})

  return str(jax.make_jaxpr(forward)(model.params, tree))


def test_the_scanned_program_holds_one_layer():
  """The unrolled jaxpr has dot_generals per projection per layer; the scanned one a layer's worth."""
  unrolled, scanned = _jaxpr(_model(False)), _jaxpr(_model(True))
  assert " scan[" in scanned and " scan[" not in unrolled
  assert scanned.count("dot_general") <= unrolled.count("dot_general") / LAYERS + 2


def test_scanned_round_equals_the_unrolled_round(make_lm_config):
  losses = {}
  for scan in (False, True):
    exp = experiment.build(make_lm_config(**{"model.scan_layers": scan, "model.remat": "block"}))
    state, record = experiment.run_round(exp, exp.init_state(), 0)
    losses[scan] = record["client_losses"]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_scanning_a_family_without_it_is_refused():
  with pytest.raises(ValueError, match=r"config.model.scan_layers=True is implemented for \('llama',\)"):
    scan_layers.check("gpt2", True)
