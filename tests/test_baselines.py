"""Baselines end to end: local training hooks, per-client states through real rounds, resume.

The server rules alone are checked on synthetic trees in test_server_rules.py."""
import numpy as np
import pytest

from frlora_jax import algorithms, experiment, lora


def _np(x):
  return np.asarray(x, np.float64)


def _leaves(tree):
  import jax
  return [_np(x) for x in jax.tree_util.tree_leaves(tree)]


def _mean(stacked, w):
  return [np.einsum("k,k...->...", w, x) for x in _leaves(stacked)]


def _rounds(make_config, algorithm, n=2, **overrides):
  """Run n rounds by hand; return the experiment and, per round, (state_in, updates, state_out)."""
  exp = experiment.build(make_config(**{"fl.algorithm": algorithm, **overrides}))
  state, history = exp.init_state(), []
  for r in range(n):
    updates = experiment.local_updates(exp, state, r)
    new_state = experiment.server_update(exp, state, updates)
    history.append((state, updates, new_state))
    state = new_state
  return exp, history


def _trainable(server):
  return {"lora": server.lora, "head": server.head}


def test_fedprox_pulls_clients_towards_the_global_model(make_config):
  drift = {}
  for name, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
    _, [(before, updates, _)] = _rounds(make_config, name, n=1, **{"fl.prox_mu": mu, "fl.local_steps": 6})
    start = _leaves(_trainable(before.server))
    drift[name] = sum(np.abs(y - s[None]).sum() for y, s in zip(_leaves(updates.output.trainable), start))
  assert drift["fedprox"] < 0.9 * drift["fedavg"]


def test_scaffold_control_variates(make_config):
  exp, history = _rounds(make_config, "scaffold", n=2, **{"fl.num_clients": 4, "fl.clients_per_round": 2})
  k_eta = exp.config.fl.local_steps * exp.config.optim.lr
  for before, updates, after in history:
    w, ids = _np(updates.weights), updates.ids
    x, c = _leaves(_trainable(before.server)), _leaves(before.server.algorithm_state["c"])
    c_i = [v[ids] for v in _leaves(before.client_states["c_i"])]
    y = _leaves(updates.output.trainable)
    c_plus = [ci - c_[None] + (x_[None] - y_) / k_eta for ci, c_, x_, y_ in zip(c_i, c, x, y)]
    expected_c = [c_ + (2 / 4) * np.einsum("k,k...->...", w, cp - ci) for c_, cp, ci in zip(c, c_plus, c_i)]
    for got, exp_ in zip(_leaves(after.server.algorithm_state["c"]), expected_c):
      np.testing.assert_allclose(got, exp_, rtol=1e-4, atol=1e-5)
    for got, exp_ in zip(_leaves(after.client_states["c_i"]), c_plus):
      np.testing.assert_allclose(got[ids], exp_, rtol=1e-4, atol=1e-5)
    for got, exp_ in zip(_leaves(_trainable(after.server)), _mean(updates.output.trainable, w)):
      np.testing.assert_allclose(got, exp_, atol=1e-6)
  # in round 2 some control variates are non-zero, so the correction is exercised
  assert max(np.abs(v).max() for v in _leaves(history[1][0].server.algorithm_state["c"])) > 0


def test_fedsa_lora_shares_a_and_keeps_b(make_config):
  exp, history = _rounds(make_config, "fedsa_lora", n=2)
  before, updates, after = history[1]
  w, ids = _np(updates.weights), updates.ids
  entries = lora.lora_entries(updates.output.trainable["lora"])
  for path, got in lora.lora_entries(after.server.lora).items():
    np.testing.assert_allclose(_np(got["a"]), np.einsum("k,k...->...", w, _np(entries[path]["a"])), atol=1e-6)
    kept = _np(lora.lora_entries(after.client_states["b"])[path]["b"])
    np.testing.assert_array_equal(kept[ids], _np(entries[path]["b"]))
  # clients keep different B's between rounds (personal state really persists)
  previous_b = lora.lora_entries(history[0][2].client_states["b"])
  assert any(np.abs(_np(previous_b[p]["b"])[0] - _np(previous_b[p]["b"])[1]).max() > 0 for p in previous_b)
  personal = experiment.evaluate_personal(exp, after)
  assert set(personal) >= {"accuracy", "mcc"}


@pytest.mark.parametrize("name", algorithms.names())
def test_algorithm_state_survives_resume(make_config, tmp_path, name):
  """Drop the last checkpoint of a finished run: resuming from the one before must redo
  the last round exactly (server state, client states and kept optimizers restored)."""
  import json
  import shutil
  config = make_config(**{"fl.rounds": 2, "fl.algorithm": name, "fl.keep_optimizer_state": name == "frlora",
                          "fl.server_lr": 0.05, "keep_checkpoints": 2})
  experiment.run(config, str(tmp_path / "run"))
  full = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
  redone = experiment.run(config, str(tmp_path / "run"))
  assert [r["round"] for r in redone] == [2]
  for key in ("train_loss", "client_losses", "eval"):
    assert redone[0][key] == full[1][key], key
