"""Heterogeneous client ranks (ranks.py) and HetLoRA: padded clients equal unpadded ones, the
published HetLoRA rule in NumPy, self-pruning, and the errors for bad settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frlora_jax import config_checks, experiment, lora, ranks
from frlora_jax.algorithms.hetlora import hetlora
from test_server_rules import D_IN, D_OUT, TARGETS, _np, _server

R_MAX = 4


def test_rank_specs():
  np.testing.assert_array_equal(ranks.parse("4,8,16", 3, 16), [4, 8, 16])
  np.testing.assert_array_equal(ranks.parse("tiers:4,8", 5, 8), [4, 8, 4, 8, 4])
  np.testing.assert_array_equal(ranks.parse("halved:3", 4, 16), [16, 8, 4, 16])
  np.testing.assert_array_equal(ranks.parse((2, 4), 2, 4), [2, 4])
  assert ranks.parse("", 3, 16) is None


@pytest.mark.parametrize("spec, message", [
    ("4,8", "gives 2 ranks for 3 clients"),
    ("4,8,32", "raise it to 32"),
    ("0,4,4", "rank >= 1"),
    ("four", "whole numbers"),
    ("halved:0", "halved:T"),
])
def test_bad_rank_specs_name_the_field(spec, message):
  with pytest.raises(ValueError, match="config.fl.client_ranks") as info:
    ranks.parse(spec, 3, 16)
  assert message in str(info.value)


def test_config_check_rejects_ranks_for_an_algorithm_without_them(make_config):
  with pytest.raises(ValueError, match="does not define clients with different ranks"):
    config_checks.check(make_config(**{"fl.algorithm": "fedavg", "fl.client_ranks": "2,4,4"}))
  with pytest.raises(ValueError, match="gives 2 ranks for 3 clients"):
    config_checks.check(make_config(**{"fl.algorithm": "flora", "fl.client_ranks": "2,4"}))
  with pytest.raises(ValueError, match="hetlora_prune_gamma"):
    config_checks.check(make_config(**{"fl.algorithm": "hetlora", "fl.hetlora_prune_gamma": 1.5}))


def test_hetlora_aggregate_matches_the_published_rule_on_unpadded_factors():
  """NumPy: clients of ranks 1, 2, 4 with their own (unpadded) factors; weights ||A_k B_k||_F summed over
  layers, normalised; zero-pad and sum A and B; the result sliced back to each rank."""
  rng = np.random.default_rng(0)
  algorithm = hetlora()
  server = _server(algorithm, rng)
  server = server.replace(lora=lora.init_kaiming(jax.random.PRNGKey(0), {p: (D_IN, D_OUT) for p in TARGETS}, R_MAX))
  client_ranks = [1, 2, 4]
  unpadded = [{p: {"a": rng.normal(size=(D_IN, r)), "b": rng.normal(size=(r, D_OUT))} for p in TARGETS}
              for r in client_ranks]
  norms = np.array([sum(np.linalg.norm(f["a"] @ f["b"]) for f in c.values()) for c in unpadded])
  weights = norms / norms.sum()

  def padded(f, r):
    return {"a": np.pad(f["a"], ((0, 0), (0, R_MAX - r))), "b": np.pad(f["b"], ((0, R_MAX - r), (0, 0)))}

  expected = {p: {n: sum(w * padded(c[p], r)[n] for w, c, r in zip(weights, unpadded, client_ranks)) for n in "ab"}
              for p in TARGETS}
  stacked_lora = lora.from_entries({p: {n: jnp.asarray(np.stack([padded(c[p], r)[n] for c, r in
                                                                  zip(unpadded, client_ranks)]), jnp.float32)
                                        for n in "ab"} for p in TARGETS})
  heads = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 3), server.head)
  new, _ = algorithm.aggregate(server, {"lora": stacked_lora, "head": heads}, jnp.full((3,), 1 / 3), None)
  for path, got in lora.lora_entries(new.lora).items():
    for n in "ab":
      np.testing.assert_allclose(_np(got[n]), expected[path][n], rtol=1e-5, atol=1e-6)
  # each client continues from the first r_k components of that global LoRA
  for r in client_ranks:
    sliced = ranks.mask_lora(new.lora, ranks.masks(r, R_MAX))
    for path, got in lora.lora_entries(sliced).items():
      np.testing.assert_allclose(_np(got["a"])[:, :r], expected[path]["a"][:, :r], rtol=1e-5, atol=1e-6)
      assert not np.any(_np(got["a"])[:, r:]) and not np.any(_np(got["b"])[r:])


def test_hetlora_self_pruning_shrinks_a_client_whose_tail_shrank():
  algorithm = hetlora(prune_gamma=0.5, prune_lambda=1.0)
  rng = np.random.default_rng(1)
  server = _server(algorithm, rng)
  start = lora.init_kaiming(jax.random.PRNGKey(0), {p: (D_IN, D_OUT) for p in TARGETS}, R_MAX)
  start = lora.map_lora(lambda e: {"a": e["a"], "b": jnp.ones_like(e["b"])}, start)
  server = server.replace(lora=start)
  shrunk = lora.map_lora(lambda e: {"a": e["a"], "b": e["b"].at[2:].multiply(0.5)}, start)  # tail (2, 3) halved
  grown = lora.map_lora(lambda e: {"a": e["a"], "b": e["b"].at[2:].multiply(2.0)}, start)
  trainables = jax.tree_util.tree_map(lambda *x: jnp.stack(x), shrunk, grown)
  new_ranks = algorithm.update_ranks(server, {"lora": trainables}, jnp.asarray([4, 4], jnp.int32))
  np.testing.assert_array_equal(np.asarray(new_ranks), [2, 4])
  # the penalty is lambda * sum ||A_tail|| ||B_tail|| over the client's own tail
  client = type("Client", (), {"rank_mask": ranks.masks(4, R_MAX)})()
  tail = {p: (np.linalg.norm(_np(e["a"])[:, 2:]), np.linalg.norm(_np(e["b"])[2:]))
          for p, e in lora.lora_entries(start).items()}
  np.testing.assert_allclose(float(algorithm.regularizer({"lora": start}, client)),
                             sum(a * b for a, b in tail.values()), rtol=1e-5)


def _client_phase(exp, state, ids=(0, 1, 2)):
  ids = np.asarray(ids)
  inputs, _ = experiment.start_round(state, jnp.asarray(ids, jnp.int32), jnp.int32(0), jnp.int32(2),
                                     exp.train_batches.counts, algorithm=exp.algorithm,
                                     plan=experiment.RoundPlan.from_config(exp.config))
  return inputs.replace(batches=exp.train_batches.for_round(0, ids, None))


@pytest.mark.parametrize("algorithm", ["flora", "hetlora"])
def test_padded_client_trains_exactly_like_an_unpadded_one(make_config, algorithm):
  """A rank-2 client padded to rank 4 gives the rank-2 client's factors, and zeros beyond them."""
  padded_exp = experiment.build(make_config(**{"fl.algorithm": algorithm, "fl.client_ranks": "2,4,4",
                                              "lora.rank": 4, "lora.alpha": 8.0}))
  plain_exp = experiment.build(make_config(**{"fl.algorithm": algorithm, "lora.rank": 2, "lora.alpha": 4.0}))
  inputs = _client_phase(padded_exp, padded_exp.init_state())
  assert np.asarray(inputs.rank_mask).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
  unpadded_start = jax.tree_util.tree_map(jnp.copy, dict(inputs.start, lora=lora.map_lora(  # starts are donated
      lambda e: {"a": e["a"][..., :2], "b": e["b"][:, :2]}, inputs.start["lora"])))
  padded_out = padded_exp.train_clients({"base": padded_exp.initial_server.base}, inputs)
  plain_out = plain_exp.train_clients({"base": plain_exp.initial_server.base},
                                      inputs.replace(start=unpadded_start, rank_mask=None))
  for path, got in lora.lora_entries(padded_out.trainable["lora"]).items():
    want = lora.lora_entries(plain_out.trainable["lora"])[path]
    np.testing.assert_allclose(_np(got["a"])[0, :, :2], _np(want["a"])[0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(_np(got["b"])[0, :2], _np(want["b"])[0], rtol=2e-5, atol=1e-6)
    assert not np.any(_np(got["a"])[0, :, 2:]) and not np.any(_np(got["b"])[0, 2:])
  np.testing.assert_allclose(_np(padded_out.loss)[0], _np(plain_out.loss)[0], rtol=1e-5)


def test_frlora_clients_keep_components_beyond_their_rank_frozen(make_config):
  exp = experiment.build(make_config(**{"fl.algorithm": "frlora", "fl.client_ranks": "2,4,4"}))
  state = exp.init_state()
  inputs = _client_phase(exp, state)
  out = exp.train_clients({"base": exp.initial_server.base}, inputs)
  for path, got in lora.lora_entries(out.trainable["lora"]).items():
    start = lora.lora_entries(state.server.lora)[path]
    np.testing.assert_array_equal(_np(got["a"])[0, :, 2:], _np(start["a"])[:, 2:])  # the PiSSA tail, untouched
    np.testing.assert_array_equal(_np(got["b"])[0, 2:], _np(start["b"])[2:])
    assert np.any(_np(got["b"])[0, :2] != _np(start["b"])[:2])                    # its own rank trained
    assert np.any(_np(got["b"])[1, 2:] != _np(start["b"])[2:])                    # a rank-4 client trains all


def test_heterogeneous_rounds_run_and_log_ranks(make_config):
  exp = experiment.build(make_config(**{"fl.algorithm": "hetlora", "fl.client_ranks": "tiers:1,2,4",
                                        "fl.hetlora_prune_gamma": 0.5, "fl.hetlora_prune_lambda": 1.0}))
  state = exp.init_state()
  seen = []
  for r in range(3):
    state, record = experiment.run_round(exp, state, r)
    seen.append(record["client_ranks"])
    assert np.isfinite(record["train_loss"])
  assert seen[0] == [1, 2, 4]  # round 1 starts from B = 0: no tail to shrink yet
  assert all(b <= a for prev, cur in zip(seen, seen[1:]) for a, b in zip(prev, cur))
  assert sum(seen[-1]) < sum(seen[0])  # lambda = 1 shrinks a tail within two rounds


def test_communication_counts_each_clients_own_rank():
  """A rank-r_k client moves r_k of the r_max components: both ways under 'truncate', up only under
  'freeze' (FRLoRA starts from the whole global factors); the head's bytes do not scale; equal ranks
  keep the one figure per client."""
  trainable = {"lora": lora.init_kaiming(jax.random.PRNGKey(0), {p: (D_IN, D_OUT) for p in TARGETS}, R_MAX),
               "head": {"kernel": jnp.zeros((D_OUT, 3), jnp.float32)}}
  per_rank = len(TARGETS) * (D_IN + D_OUT) * 4   # float32 bytes of one component of A and B, every target
  head = D_OUT * 3 * 4
  ranks_of_round = [1, 2, 4]
  het = experiment.communication_bytes(hetlora(), trainable, 3, np.asarray(ranks_of_round))
  assert het["upload_per_client"] == het["download_per_client"] == [r * per_rank + head for r in ranks_of_round]
  assert het["total"] == 2 * sum(het["upload_per_client"])
  from frlora_jax.algorithms.flora import flora
  from frlora_jax.algorithms.frlora import frlora
  stacked = experiment.communication_bytes(flora(lora_scale=1.0), trainable, 3, np.asarray(ranks_of_round))
  assert stacked["download_per_client"] == [sum(ranks_of_round) * per_rank + head] * 3  # every client's factors
  frozen = experiment.communication_bytes(frlora(lora_scale=1.0, aggregation="factors"), trainable, 3,
                                          np.asarray(ranks_of_round))
  assert frozen["upload_per_client"] == het["upload_per_client"]
  assert frozen["download_per_client"] == [R_MAX * per_rank + head] * 3
  equal = experiment.communication_bytes(hetlora(), trainable, 3)
  assert equal == {"upload_per_client": R_MAX * per_rank + head, "download_per_client": R_MAX * per_rank + head,
                   "total": 6 * (R_MAX * per_rank + head)}


def test_a_heterogeneous_run_logs_each_clients_bytes(make_config, tmp_path):
  records = experiment.run(make_config(**{"fl.algorithm": "flexlora", "fl.client_ranks": "1,2,4", "fl.rounds": 1}),
                           str(tmp_path))
  comm, clients = records[-1]["communication"], records[-1]["clients"]
  assert records[-1]["client_ranks"] == [[1, 2, 4][k] for k in clients]
  up = comm["upload_per_client"]
  assert len(up) == len(clients) and comm["download_per_client"] == up  # 'truncate': the same r_k both ways
  by_rank = {[1, 2, 4][k]: u for k, u in zip(clients, up)}
  component = by_rank[2] - by_rank[1]  # the bytes of one rank component (A column, B row, every target)
  assert component > 0 and by_rank[4] - by_rank[1] == 3 * component
  assert comm["total"] == 2 * sum(up)
