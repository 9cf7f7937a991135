"""vmap (whole and chunked), lax.map and the Python loop give the same client updates."""
import jax
import numpy as np
import pytest

from frlora_jax import client, experiment


def _updates(make_config, executor, chunk=0):
  exp = experiment.build(make_config(**{"fl.executor": executor, "fl.clients_per_chunk": chunk,
                                        "fl.num_clients": 4}))
  return experiment.local_updates(exp, exp.init_state(), 0).output


def test_executors_agree(make_config):
  reference = _updates(make_config, "loop")
  for executor, chunk in (("map", 0), ("vmap", 0), ("vmap", 3)):
    got = _updates(make_config, executor, chunk)
    for ref, out in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(got)):
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-4, atol=2e-5,
                                 err_msg=f"{executor} chunk={chunk}")
  # the clients really differ from each other (the comparison is not vacuous)
  b = jax.tree_util.tree_leaves(reference.trainable["lora"])[1]
  assert np.abs(np.asarray(b[0] - b[1])).max() > 1e-4


def test_auto_executor_per_backend():
  assert client.resolve_executor("auto", "cpu") == "map"
  assert client.resolve_executor("auto", "gpu") == "vmap"
  assert client.resolve_executor("loop", "gpu") == "loop"


def test_rounds_after_the_first_compile_nothing(make_config, tmp_path):
  from frlora_jax import compile_count
  for executor, algorithm in (("map", "frlora"), ("vmap", "scaffold"), ("loop", "fedsa_lora")):
    exp = experiment.build(make_config(**{"fl.executor": executor, "fl.algorithm": algorithm,
                                          "fl.num_clients": 4, "fl.clients_per_round": 2}))
    state, _ = experiment.run_round(exp, exp.init_state(), 0)
    experiment.evaluate(exp, state.server)
    with compile_count.counting() as compiles:
      for r in range(1, 4):  # other clients are sampled each round: same shapes, no new programs
        state, _ = experiment.run_round(exp, state, r)
        experiment.evaluate(exp, state.server)
    assert compiles() == 0, f"{executor}/{algorithm}: {compiles()} compilations after round 1"


MULTI_DEVICE = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np, conftest
from frlora_jax import experiment
assert jax.device_count() == 4, jax.devices()
out = {{}}
for shard in ("on", "off"):
  for executor in ("map", "vmap"):
    c = conftest.tiny_config({model!r}, {data!r}, **{{"fl.executor": executor, "fl.shard_clients": shard,
                                                      "fl.num_clients": 5}})
    exp = experiment.build(c)
    state, record = experiment.run_round(exp, exp.init_state(), 0)
    out[shard + executor] = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.server)]
    out[shard + executor + "loss"] = record["client_losses"]
print(json.dumps(out))
"""


def test_clients_sharded_over_four_cpu_devices_match_one(tiny_model_dir, sentiment_csv):
  import json
  import os
  import subprocess
  import sys
  from conftest import ROOT
  script = MULTI_DEVICE.format(tests=os.path.join(ROOT, "tests"),
                               model=tiny_model_dir, data=sentiment_csv)
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for executor in ("map", "vmap"):
    assert out[f"on{executor}loss"] == pytest.approx(out[f"off{executor}loss"], rel=1e-5)
    for sharded, single in zip(out[f"on{executor}"], out[f"off{executor}"]):
      np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_master_params(make_config):
  exp = experiment.build(make_config(**{"model.dtype": "bfloat16"}))
  state, record = experiment.run_round(exp, exp.init_state(), 0)
  assert np.isfinite(record["train_loss"])
  for tree in (state.server.lora, state.server.head):
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)} == {"float32"}
  # the client updates were computed in bf16: they differ from the float32 run
  exp32 = experiment.build(make_config())
  _, record32 = experiment.run_round(exp32, exp32.init_state(), 0)
  assert record["client_losses"] != record32["client_losses"]


def test_dropout_bits_reach_the_client_steps(make_config):
  """config.model.dropout_bits changes the dropout masks a round trains with, nothing else."""
  losses = {}
  for bits in (32, 8):
    exp = experiment.build(make_config(**{"model.dropout_bits": bits, "lora.dropout": 0.1}))
    _, record = experiment.run_round(exp, exp.init_state(), 0)
    assert np.isfinite(record["train_loss"])
    losses[bits] = record["client_losses"]
  default = experiment.build(make_config(**{"lora.dropout": 0.1}))
  assert experiment.run_round(default, default.init_state(), 0)[1]["client_losses"] == losses[32]
  assert losses[8] != losses[32]


def test_a_terminal_does_not_change_the_round(make_config, monkeypatch):
  """The progress callback is compiled in either way: same losses and model with and without a terminal,
  and on a terminal the per-client bar sees every client. client_progress=False (no callback) changes
  nothing either."""
  import sys
  results = []
  for tty, progress in ((False, True), (True, True), (True, False)):
    monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
    exp = experiment.build(make_config(client_progress=progress))
    exp.client_bar.start(exp.num_clients, last_round_s=1e6)  # a long previous round: show the bar
    state, record = experiment.run_round(exp, exp.init_state(), 0)
    ticks = exp.client_bar.bar.n if exp.client_bar.bar is not None else None
    exp.client_bar.stop()
    results.append((record["client_losses"], [np.asarray(x) for x in jax.tree_util.tree_leaves(state.server)]))
    assert ticks == ((exp.num_clients if progress else 0) if tty else None)
  (losses_plain, leaves_plain), *others = results
  for losses, leaves in others:
    assert losses == losses_plain
    for a, b in zip(leaves_plain, leaves):
      np.testing.assert_array_equal(a, b)


def test_init_and_round_streams_are_separate():
  from frlora_jax import rng
  init_key, rounds_key = rng.random_streams(0)
  used_at_init = {tuple(np.asarray(k).tolist()) for k in (init_key, *jax.random.split(init_key))}
  round_keys = [jax.random.fold_in(rounds_key, r) for r in range(100)]
  client_keys = [jax.random.fold_in(k, i) for k in round_keys[:10] for i in range(10)]
  assert not used_at_init & {tuple(np.asarray(k).tolist()) for k in round_keys + client_keys}
  # the same seed gives the same streams; another seed other streams
  assert np.array_equal(rng.random_streams(0)[1], rounds_key)
  assert not np.array_equal(rng.random_streams(1)[1], rounds_key)


def test_frozen_a_gets_no_gradient_and_no_optimizer_state(make_config):
  exp = experiment.build(make_config(**{"fl.algorithm": "ffa_lora", "fl.keep_optimizer_state": True}))
  state = exp.init_state()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.client_opt)]
  assert any("'b'" in p for p in paths) and not any("'a'" in p for p in paths)
  updates = experiment.local_updates(exp, state, 0)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates.output.opt_state)]
  assert opt_paths == paths
  # A comes back exactly as it went in; B moved
  from frlora_jax import lora
  for path, entry in lora.lora_entries(updates.output.trainable["lora"]).items():
    start = lora.lora_entries(state.server.lora)[path]
    np.testing.assert_array_equal(np.asarray(entry["a"]), np.broadcast_to(start["a"], entry["a"].shape))
    assert np.abs(np.asarray(entry["b"]) - np.asarray(start["b"])[None]).max() > 0
