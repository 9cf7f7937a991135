"""Federated instruction tuning of tiny causal LMs through the real round loop, CLI and checkpoints."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import write_tiny_lm

from frlora_jax import experiment, run_log


def test_frlora_on_tiny_llama_learns_and_logs_before_and_after(make_lm_config, tmp_path):
  config = make_lm_config(**{"fl.rounds": 4, "fl.clients_per_round": 2, "eval_before_training": True,
                             "eval_every": 2})
  records = experiment.run(config, str(tmp_path))
  assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
  before, after = records[0]["eval"], records[-1]["eval"]
  assert set(before) >= {"loss", "perplexity", "exact_match", "answered"}
  assert after["loss"] < before["loss"] - 0.5  # response tokens of the exam answers get likelier
  np.testing.assert_allclose(after["perplexity"], np.exp(after["loss"]), rtol=1e-6)
  assert all(len(r["clients"]) == 2 for r in records[1:])
  # the round-0 record is in metrics.jsonl, and curves.png was drawn
  logged = run_log.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert logged[0]["round"] == 0 and "train_loss" not in logged[0]
  assert os.path.exists(os.path.join(tmp_path, "curves.png"))


def test_freeing_host_memory_changes_no_result(make_lm_config, tmp_path, monkeypatch):
  """What a big model's run does between phases (gc and malloc_trim; dropping the pre-training evaluation's
  compiled programs, so they are not resident while the round runs) leaves every logged number unchanged."""
  from frlora_jax import host_memory
  config = make_lm_config(**{"fl.rounds": 1, "eval_before_training": True, "eval_every": 1})
  plain = experiment.run(config, str(tmp_path / "plain"))
  cleared = []
  monkeypatch.setattr(host_memory, "WORTH_IT_BYTES", 0)  # the tiny model counts as big
  monkeypatch.setattr(jax, "clear_caches", lambda clear=jax.clear_caches: cleared.append(clear()))
  freed = experiment.run(config, str(tmp_path / "freed"))
  assert cleared
  for a, b in zip(plain, freed):
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_resume_continues_an_lm_run_exactly(make_lm_config, tmp_path):
  config = make_lm_config(**{"fl.rounds": 3, "fl.clients_per_round": 2, "fl.algorithm": "fedavg",
                             "keep_checkpoints": 3})
  full = experiment.run(config, str(tmp_path / "full"))
  # The same run as if it had died after round 2: drop the round-3 checkpoint and log line.
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
  run_log.write_atomic(str(tmp_path / "resumed" / "metrics.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in full[:2]))
  rest = experiment.run(config, str(tmp_path / "resumed"))
  assert [r["round"] for r in rest] == [3]
  assert rest[0]["train_loss"] == full[-1]["train_loss"] and rest[0]["eval"] == full[-1]["eval"]


def test_gpt2_trains_through_train_py(exams_jsonl, tmp_path):
  import subprocess
  import sys
  model_dir = write_tiny_lm(tmp_path / "gpt2", "gpt2")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = ["--config.model.name=" + model_dir, "--config.data.kind=instruction", "--config.data.source=jsonl",
           "--config.data.path=" + exams_jsonl, "--config.data.messages_field=input",
           "--config.data.response_field=ideal", "--config.data.metric=perplexity",
           "--config.data.max_length=128", "--config.fl.partition=iid", "--config.fl.num_clients=2",
           "--config.fl.rounds=2", "--config.fl.local_steps=2", "--config.lora.rank=4",
           "--config.lora.targets=('c_attn$','c_fc$')", "--config.optim.batch_size=4", "--config.eval_batch_size=16"]
  result = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--config",
                           os.path.join(root, "configs", "default.py"), "--workdir", str(tmp_path / "run")] + flags,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["round"] for r in records] == [1, 2] and np.isfinite(records[-1]["eval"]["perplexity"])


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_grad_accumulation_equals_one_big_batch(tiny_llama_dir, tmp_path, algorithm):
  """batch 2 x 4 micro-batches == one batch of 8: same rows, micro-batches weighted by response tokens.

  Responses vary in length, so an unweighted mean of micro-batch losses would differ; Llama has no
  dropout and LoRA dropout is off, so the two runs see the same function."""
  from conftest import tiny_lm_config, write_jsonl
  rng = np.random.default_rng(0)
  rows = [{"input": [{"role": "user", "content": f"Say yes {i % 7} times."}],
           "ideal": " ".join(["yes"] * int(rng.integers(1, 12))), "language": ["a", "b"][i % 2]} for i in range(60)]
  data = write_jsonl(tmp_path / "yes.jsonl", rows)
  outputs = {}
  for batch, accum in ((8, 1), (2, 4)):
    config = tiny_lm_config(tiny_llama_dir, data, **{
        "optim.batch_size": batch, "optim.grad_accum": accum, "lora.dropout": 0.0, "fl.algorithm": algorithm,
        "fl.prox_mu": 0.5, "fl.num_clients": 2, "fl.local_steps": 3, "data.answer_format": "none",
        "data.metric": "perplexity", "data.reference_field": ""})
    exp = experiment.build(config)
    out = experiment.local_updates(exp, exp.init_state(), 0).output
    outputs[accum] = (np.asarray(out.loss), [np.asarray(x) for x in jax.tree_util.tree_leaves(out.trainable)])
  np.testing.assert_allclose(outputs[4][0], outputs[1][0], rtol=1e-5)
  for accumulated, big in zip(outputs[4][1], outputs[1][1]):
    np.testing.assert_allclose(accumulated, big, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [5, 512])
def test_chunked_loss_equals_the_full_logits_loss(arch, chunk):
  """Loss and LoRA gradients from (hidden, kernel) in chunks equal response_loss on full logits."""
  from frlora_jax import causal_lm, lora, workloads
  model = causal_lm.random_causal_lm(arch, hidden=32, layers=2, heads=4, vocab=300, max_positions=64,
                                     initializer_range=0.2)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 300, size=(3, 23)).astype(np.int32)
  mask = (rng.random((3, 23)) < 0.6).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask}
  base, _ = lora.split_tree(model.params, model.head_patterns)
  targets = lora.find_targets(base, [r"(q|v)_proj$", r"c_attn$"])
  tree = lora.map_lora(lambda e: {"a": e["a"], "b": e["b"] + 0.05},
                       lora.init_kaiming(jax.random.PRNGKey(0), targets, 4))
  full, hidden = causal_lm.make_apply(model), causal_lm.make_hidden_apply(model)

  def loss(tree, chunked):
    with lora.interceptor(tree, 2.0):
      if chunked:
        return workloads.chunked_response_loss(hidden(base, batch), batch, chunk)
      return workloads.response_loss(full(base, batch), batch)

  (value, grads), (value_c, grads_c) = (jax.value_and_grad(loss)(tree, c) for c in (False, True))
  np.testing.assert_allclose(float(value_c), float(value), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_c), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 512])
def test_chunked_eval_sums_equal_the_full_logits_ones(chunk):
  """Evaluation's per-row response cross-entropy sums and token counts, from (hidden, kernel) in chunks."""
  from frlora_jax import causal_lm, lora, workloads
  model = causal_lm.random_causal_lm("llama", hidden=32, layers=2, heads=4, vocab=300, max_positions=64,
                                     initializer_range=0.2)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 300, size=(3, 23)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "loss_mask": (rng.random((3, 23)) < 0.6).astype(np.int32)}
  base, _ = lora.split_tree(model.params, model.head_patterns)
  sums, counts = workloads.chunked_token_sums(causal_lm.make_hidden_apply(model)(base, batch), batch, chunk)
  ce, mask = workloads.token_losses(causal_lm.make_apply(model)(base, batch), batch)
  np.testing.assert_allclose(np.asarray(sums), np.asarray((ce * mask).sum(-1)), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), np.asarray(mask.sum(-1)))


def test_chunked_loss_holds_no_full_logits():
  """In the compiled gradient, no buffer has the [batch, seq, vocab] float32 shape of full logits."""
  from frlora_jax import causal_lm, lora, workloads
  model = causal_lm.random_causal_lm("llama", hidden=32, layers=1, heads=4, vocab=5000, max_positions=256)
  base, _ = lora.split_tree(model.params, model.head_patterns)
  tree = lora.init_kaiming(jax.random.PRNGKey(0), lora.find_targets(base, [r"q_proj$"]), 4)
  ids = np.zeros((4, 128), np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
  hidden = causal_lm.make_hidden_apply(model)

  def loss(tree):
    with lora.interceptor(tree, 2.0):
      return workloads.chunked_response_loss(hidden(base, batch), batch, 32)

  hlo = jax.jit(jax.grad(loss)).lower(tree).as_text()
  assert "4x127x5000xf32" not in hlo and "4x128x5000xf32" not in hlo
  assert "4x32x5000xf32" in hlo  # one chunk's logits
