"""Packed instruction rows (data.pack) and response-only logits give the unpacked losses and gradients."""
import dataclasses

import jax
import numpy as np
import pytest

from frlora_jax import causal_lm, experiment, lora, workloads
from frlora_jax.data import batching


def _examples(rng, n, vocab=300):
  """Variable-length token lists with a response mask on each one's last few tokens."""
  ids, masks = [], []
  for _ in range(n):
    length = int(rng.integers(5, 14))
    ids.append(rng.integers(3, vocab, size=length).tolist())
    masks.append([0] * (length - 3) + [1, 1, 1])
  return ids, masks


def _lora_tree(base):
  targets = lora.find_targets(base, [r"(q|v)_proj$"])
  return lora.map_lora(lambda e: {"a": e["a"], "b": e["b"] + 0.05}, lora.init_kaiming(jax.random.PRNGKey(0), targets, 4))


def _summed_loss(model):
  """(LoRA tree -> batch -> summed response cross-entropy) on `model`'s base, and a LoRA tree to take it at."""
  base, _ = lora.split_tree(model.params, model.head_patterns)
  hidden = causal_lm.make_hidden_apply(model)

  def summed_loss(tree, batch):
    with lora.interceptor(tree, 2.0):
      return workloads.chunked_response_loss(hidden(base, batch), batch, 8) * batch["loss_mask"][:, 1:].sum()

  return summed_loss, _lora_tree(base)


def _assert_same_loss_and_gradients(summed_loss, tree, batch, reference):
  (value, grads), (value_r, grads_r) = (jax.value_and_grad(summed_loss)(tree, b) for b in (batch, reference))
  np.testing.assert_allclose(float(value), float(value_r), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  return float(value)


def test_packing_puts_every_example_in_one_row_within_the_length():
  sizes = np.array([5, 9, 3, 7, 16, 2, 8])
  rows = batching.pack_examples(sizes, np.arange(len(sizes)), 16)
  assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
  assert all(sizes[row].sum() <= 16 for row in rows)
  assert len(rows) < len(sizes)  # some rows hold several examples


@pytest.mark.parametrize("scan", [False, True])
def test_a_packed_row_gives_each_examples_own_loss_and_gradients(scan):
  """Per-example attention (segments) and restarted positions: the packed batch's summed response
  cross-entropy and its LoRA gradients equal those of the examples run one per row."""
  model = causal_lm.random_causal_lm("llama", hidden=32, layers=2, heads=4, kv_heads=2, vocab=300, max_positions=64,
                                     initializer_range=0.2)
  model = dataclasses.replace(model, scan_layers=scan)
  ids, masks = _examples(np.random.default_rng(0), 7)
  rows = batching.pack_examples([len(s) for s in ids], np.arange(7), 32)
  packed = batching.packed_lm_arrays(ids, masks, rows, 32, pad_id=0)
  packed.update(batching.response_positions(packed["loss_mask"]))
  single = batching.lm_arrays(ids, masks, 16, pad_id=0)
  assert packed["input_ids"].shape[0] < single["input_ids"].shape[0]
  _assert_same_loss_and_gradients(*_summed_loss(model), packed, single)


@pytest.mark.parametrize("scan", [False, True])
def test_a_shared_prefix_laid_once_per_row_gives_each_examples_own_loss_and_gradients(scan):
  """data.shared_prefix: examples that start with the same tokens (a system prompt) share one copy of them
  per packed row; the summed response cross-entropy and LoRA gradients equal the examples run one per row."""
  model = causal_lm.random_causal_lm("llama", hidden=32, layers=2, heads=4, kv_heads=2, vocab=300, max_positions=64,
                                     initializer_range=0.2)
  model = dataclasses.replace(model, scan_layers=scan)
  rng = np.random.default_rng(4)
  rest, masks = _examples(rng, 7)
  system = rng.integers(3, 300, size=6).tolist()
  ids, masks = [system + r for r in rest], [[0] * 6 + m for m in masks]
  prefix = batching.shared_prefix_length(ids, masks)
  assert prefix == 6  # the random remainders share no first token
  sizes = [len(s) - prefix for s in ids]
  rows = batching.pack_examples(sizes, np.arange(7), 32 - prefix)
  shared = batching.packed_lm_arrays(ids, masks, rows, 32, pad_id=0, prefix=prefix)
  shared.update(batching.response_positions(shared["loss_mask"]))
  assert (shared["segment_ids"][:, :prefix] == batching.SHARED_PREFIX_SEGMENT).all()
  assert shared["attention_mask"].sum() == sum(len(s) for s in ids) - prefix * (len(ids) - len(rows))
  single = batching.lm_arrays(ids, masks, 24, pad_id=0)
  summed_loss, tree = _summed_loss(model)
  value_p = _assert_same_loss_and_gradients(summed_loss, tree, shared, single)
  hidden_only = {**shared, "segment_ids": np.where(shared["segment_ids"] < 0, 99, shared["segment_ids"])}
  assert abs(float(summed_loss(tree, hidden_only)) - float(value_p)) > 1e-3  # the examples do read the prefix


def test_the_shared_prefix_stops_before_the_first_response_target():
  """A prefix position predicts the next token for every example in the row at once, so it may only
  predict a prompt token: the shared prefix ends before the earliest response."""
  ids = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 4, 3]]
  assert batching.shared_prefix_length(ids, [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]) == 3
  assert batching.shared_prefix_length(ids, [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]) == 4
  assert batching.shared_prefix_length([[5, 6], [7, 6]], [[0, 1], [0, 1]]) == 0


def test_without_segments_packed_examples_would_see_each_other():
  """The segment mask is what keeps examples apart: dropping it changes the loss."""
  model = causal_lm.random_causal_lm("llama", hidden=32, layers=2, heads=4, vocab=300, max_positions=64,
                                     initializer_range=0.2)
  ids, masks = _examples(np.random.default_rng(1), 6)
  packed = batching.packed_lm_arrays(ids, masks, batching.pack_examples([len(s) for s in ids], np.arange(6), 32),
                                     32, pad_id=0)
  base, _ = lora.split_tree(model.params, model.head_patterns)
  hidden = causal_lm.make_hidden_apply(model)
  with_segments = workloads.chunked_response_loss(hidden(base, packed), packed, 8)
  unsegmented = {k: v for k, v in packed.items() if k != "segment_ids"}
  assert abs(float(workloads.chunked_response_loss(hidden(base, unsegmented), unsegmented, 8)) - float(with_segments)) > 1e-4


def test_response_positions_loss_equals_the_loss_over_every_position():
  """Logits only where the next token is a response token: same loss and gradients as at every position."""
  model = causal_lm.random_causal_lm("llama", hidden=32, layers=2, heads=4, vocab=300, max_positions=64,
                                     initializer_range=0.2)
  rng = np.random.default_rng(2)
  ids = rng.integers(0, 300, size=(3, 23)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": (rng.random((3, 23)) < 0.3).astype(np.int32)}
  gathered = {**batch, **batching.response_positions(batch["loss_mask"])}
  assert gathered["response_positions"].shape[1] < 22
  base, _ = lora.split_tree(model.params, model.head_patterns)
  hidden = causal_lm.make_hidden_apply(model)

  def loss(tree, b):
    with lora.interceptor(tree, 2.0):
      return workloads.chunked_response_loss(hidden(base, b), b, 5)

  tree = _lora_tree(base)
  (value, grads), (value_g, grads_g) = (jax.value_and_grad(loss)(tree, b) for b in (batch, gathered))
  np.testing.assert_allclose(float(value_g), float(value), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_g), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_packed_run_trains_and_keeps_clients_apart(make_lm_config, tmp_path):
  """Through the data layer: each client's packed rows hold only its own examples, and a run trains."""
  from frlora_jax import data as data_lib
  from frlora_jax.models import load_tokenizer
  config = make_lm_config(**{"data.pack": 256, "fl.rounds": 3, "fl.clients_per_round": 3, "fl.local_steps": 3,
                             "eval_before_training": True, "eval_every": 3})
  built = data_lib.build(config, load_tokenizer(config.model.name))
  train = built.train
  assert {"segment_ids", "positions", "response_positions", "response_weights"} <= set(train)
  assert train["input_ids"].shape[1] == 256 and train["segment_ids"].max() > 1
  rows = np.concatenate(built.client_indices)
  assert len(np.unique(rows)) == len(rows) == len(train["input_ids"])  # each packed row belongs to one client
  examples = sum(int(train["segment_ids"][r].max()) for r in rows)
  unpacked = data_lib.build(make_lm_config(), load_tokenizer(config.model.name))
  assert examples == len(unpacked.train["input_ids"])  # packing keeps every training example once
  records = experiment.run(config, str(tmp_path))
  assert records[-1]["eval"]["loss"] < records[0]["eval"]["loss"] - 0.5


def test_shared_prefix_through_the_data_layer_keeps_every_example_in_fewer_rows(make_lm_config):
  """data.shared_prefix on the exam questions (one system prompt): every row starts with it, each example's
  remainder follows with positions continuing from it, and the same examples fill fewer rows."""
  from frlora_jax import data as data_lib
  from frlora_jax.models import load_tokenizer
  tokenizer = load_tokenizer(make_lm_config().model.name)
  plain = data_lib.build(make_lm_config(**{"data.pack": 256}), tokenizer).train
  shared = data_lib.build(make_lm_config(**{"data.pack": 256, "data.shared_prefix": True}), tokenizer).train
  prefix = int((shared["segment_ids"][0] == batching.SHARED_PREFIX_SEGMENT).sum())
  assert prefix > 10
  assert (shared["input_ids"][:, :prefix] == plain["input_ids"][0, :prefix]).all()
  first = shared["segment_ids"] == 1
  assert shared["positions"][first].min() == prefix  # each example continues from the shared prefix
  count = lambda t: sum(int(row.max()) for row in t["segment_ids"])
  assert count(shared) == count(plain) and len(shared["input_ids"]) < len(plain["input_ids"])
  assert shared["loss_mask"].sum() == plain["loss_mask"].sum()


def test_packing_is_refused_for_a_family_without_the_attention_fix():
  model = causal_lm.random_causal_lm("gpt2", hidden=32, layers=1, heads=4, vocab=300, max_positions=64)
  ids, masks = _examples(np.random.default_rng(3), 4)
  packed = batching.packed_lm_arrays(ids, masks, batching.pack_examples([len(s) for s in ids], np.arange(4), 32),
                                     32, pad_id=0)
  base, _ = lora.split_tree(model.params, model.head_patterns)
  with pytest.raises(ValueError, match=r"config.data.pack: packed rows need the Llama attention fix; 'gpt2'"):
    causal_lm.make_hidden_apply(model)(base, packed)
