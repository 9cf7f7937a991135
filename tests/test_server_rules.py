"""Every server rule against a NumPy transcription of its definition, on synthetic stacked pytrees.

No model and no local training: a small fake base with two LoRA targets, a head, and K clients'
trained trees drawn at random, so each rule's arithmetic is checked exactly and fast.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frlora_jax import algorithms, defaults, lora
from frlora_jax.algorithms import ServerState
from frlora_jax.algorithms.fedprox import proximal_term

TARGETS = (("enc", "query"), ("enc", "value"))
D_IN, D_OUT, RANK, K = 6, 5, 2, 3
SCALE = 2.0


def _np(x):
  return np.asarray(x, np.float64)


def _leaves(tree):
  return [_np(x) for x in jax.tree_util.tree_leaves(tree)]


def _config(name, **fl):
  c = defaults.get_config()
  c.fl.algorithm, c.lora.rank, c.lora.alpha = name, RANK, SCALE * RANK
  c.fl.num_clients, c.fl.server_lr = 4, 0.05
  for key, value in fl.items():
    c.fl[key] = value
  return c


def _server(algorithm, rng, pissa=False):
  base = {"enc": {p[-1]: {"kernel": rng.normal(size=(D_IN, D_OUT)).astype(np.float32)} for p in TARGETS},
          "embed": {"embedding": rng.normal(size=(7, D_IN)).astype(np.float32)}}
  base = jax.tree_util.tree_map(jnp.asarray, base)
  targets = {p: (D_IN, D_OUT) for p in TARGETS}
  if pissa:
    lora0, base = lora.init_pissa(base, targets, RANK, SCALE)
  else:
    lora0 = lora.init_kaiming(jax.random.PRNGKey(1), targets, RANK)
    lora0 = lora.map_lora(lambda e: {"a": e["a"], "b": jnp.asarray(rng.normal(size=e["b"].shape), jnp.float32)},
                          lora0)
  head = {"classifier": {"kernel": jnp.asarray(rng.normal(size=(D_OUT, 2)), jnp.float32),
                         "bias": jnp.zeros((2,), jnp.float32)}}
  return algorithm.init(ServerState(base=base, lora=lora0, head=head), jax.random.PRNGKey(7))


def _clients(server, rng, k=K, noise=0.1):
  """K clients' trained trees: the global trainable plus noise, stacked."""
  trainable = {"lora": server.lora, "head": server.head}
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(_np(x)[None] + noise * rng.normal(size=(k,) + x.shape), jnp.float32), trainable)


def _weights(rng, k=K):
  return jnp.asarray(rng.dirichlet(np.ones(k)), jnp.float32)


def _setup(name, seed=0, pissa=False, **fl):
  rng = np.random.default_rng(seed)
  config = _config(name, **fl)
  algorithm = algorithms.from_config(config)
  server = _server(algorithm, rng, pissa)
  return config, algorithm, server, rng


def _one_round(name, pissa=False, **fl):
  """(server before, stacked client trees, weights, server after) of one aggregate on random clients."""
  _, algorithm, server, rng = _setup(name, pissa=pissa, **fl)
  clients, w = _clients(server, rng), _weights(rng)
  new, _ = algorithm.aggregate(server, clients, w, None)
  return server, clients, w, new


def _product_sum(clients, path, w):
  """sum_k w_k A_k B_k of the stacked client factors at `path`."""
  entry = lora.lora_entries(clients["lora"])[path]
  a_k, b_k = _np(entry["a"]), _np(entry["b"])
  return sum(_np(w)[k] * a_k[k] @ b_k[k] for k in range(len(w)))


def _check_head_mean(server, clients, w):
  for got, leaf in zip(_leaves(server.head), _leaves(clients["head"])):
    np.testing.assert_allclose(got, np.einsum("k,k...->...", w, leaf), atol=1e-6)


@pytest.mark.parametrize("aggregation", ["factors", "product"])
def test_frlora_residual_update(aggregation):
  server, clients, w, new = _one_round("frlora", pissa=True, aggregation=aggregation)
  client_entries = lora.lora_entries(clients["lora"])
  for path, init in lora.lora_entries(server.lora).items():
    a_k, b_k = _np(client_entries[path]["a"]), _np(client_entries[path]["b"])
    if aggregation == "factors":
      agg = np.einsum("k,kir->ir", _np(w), a_k) @ np.einsum("k,kro->ro", _np(w), b_k)
    else:
      agg = _product_sum(clients, path, w)
    expected = _np(lora.get_kernel(server.base, path)) + SCALE * (agg - _np(init["a"]) @ _np(init["b"]))
    np.testing.assert_allclose(_np(lora.get_kernel(new.base, path)), expected, atol=2e-6)
    # re-init: the global LoRA stays at the PiSSA factors of the pre-trained weights
    np.testing.assert_array_equal(_np(lora.lora_entries(new.lora)[path]["a"]), _np(init["a"]))
  np.testing.assert_array_equal(_np(new.base["embed"]["embedding"]), _np(server.base["embed"]["embedding"]))
  _check_head_mean(new, clients, _np(w))


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_averages_factors_and_head(name):
  server, clients, w, new = _one_round(name)
  for got, expected in zip(_leaves({"lora": new.lora, "head": new.head}), _leaves(clients)):
    np.testing.assert_allclose(got, np.einsum("k,k...->...", _np(w), expected), atol=1e-6)
  for path in TARGETS:  # the base is never touched
    np.testing.assert_array_equal(_np(lora.get_kernel(new.base, path)), _np(lora.get_kernel(server.base, path)))


def test_fedprox_term():
  _, algorithm, server, rng = _setup("fedprox", prox_mu=0.5)
  one = jax.tree_util.tree_map(lambda x: x[0], _clients(server, rng))
  anchor = {"lora": server.lora, "head": server.head}
  expected = 0.25 * sum(np.sum((a - b) ** 2) for a, b in zip(_leaves(one), _leaves(anchor)))
  client_input = types.SimpleNamespace(start=anchor)
  assert float(algorithm.regularizer(one, client_input)) == pytest.approx(expected, rel=1e-5)
  assert float(proximal_term(one, anchor, 0.5)) == pytest.approx(expected, rel=1e-5)


def test_ffa_lora_keeps_a_and_averages_b():
  server, clients, w, new = _one_round("ffa_lora")
  client_entries = lora.lora_entries(clients["lora"])
  for path, init in lora.lora_entries(server.lora).items():
    got = lora.lora_entries(new.lora)[path]
    np.testing.assert_array_equal(_np(got["a"]), _np(init["a"]))
    np.testing.assert_allclose(_np(got["b"]), np.einsum("k,k...->...", _np(w), _np(client_entries[path]["b"])),
                               atol=1e-6)
  _check_head_mean(new, clients, _np(w))


def test_scaffold_control_variates():
  config, algorithm, server, rng = _setup("scaffold")
  k_eta = config.fl.local_steps * config.optim.lr
  states = jax.vmap(algorithm.init_client_state, axis_size=2, in_axes=None)(server)
  for _ in range(2):  # two rounds: the second starts from non-zero control variates
    clients, w = _clients(server, rng, k=2), _weights(rng, k=2)
    context = algorithm.client_context(server, jax.tree_util.tree_map(lambda x: x[0], states))
    x, c = _leaves({"lora": server.lora, "head": server.head}), _leaves(server.algorithm_state["c"])
    for got, c_, c_i in zip(_leaves(context["correction"]), c, _leaves(states["c_i"])):
      np.testing.assert_allclose(got, c_ - c_i[0], atol=1e-7)
    c_i, y = _leaves(states["c_i"]), _leaves(clients)
    c_plus = [ci - c_[None] + (x_[None] - y_) / k_eta for ci, c_, x_, y_ in zip(c_i, c, x, y)]
    expected_c = [c_ + (2 / config.fl.num_clients) * np.einsum("k,k...->...", _np(w), cp - ci)
                  for c_, cp, ci in zip(c, c_plus, c_i)]
    new, states = algorithm.aggregate(server, clients, w, states)
    for got, expected in zip(_leaves(new.algorithm_state["c"]), expected_c):
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    for got, expected in zip(_leaves(states["c_i"]), c_plus):
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    for got, expected in zip(_leaves({"lora": new.lora, "head": new.head}), y):
      np.testing.assert_allclose(got, np.einsum("k,k...->...", _np(w), expected), atol=1e-6)
    server = new
  assert max(np.abs(v).max() for v in _leaves(server.algorithm_state["c"])) > 0


def _run_server_rounds(name, rounds=3, **fl):
  """(per round: x before, Delta = weighted mean - x, x after) of a server optimizer."""
  config, algorithm, server, rng = _setup(name, **fl)
  history = []
  for _ in range(rounds):
    clients, w = _clients(server, rng), _weights(rng)
    x = _leaves({"lora": server.lora, "head": server.head})
    delta = [np.einsum("k,k...->...", _np(w), y) - x_ for y, x_ in zip(_leaves(clients), x)]
    server, _ = algorithm.aggregate(server, clients, w, None)
    history.append((x, delta, _leaves({"lora": server.lora, "head": server.head})))
  return config.fl, history


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi", "fedadam"])
def test_textbook_server_optimizers(name):
  fl, history = _run_server_rounds(name)
  tau, b1, b2, eta = fl.server_tau, fl.server_beta1, fl.server_beta2, fl.server_lr
  m = [np.zeros_like(x) for x in history[0][0]]
  v = [np.zeros_like(x) for x in m] if name == "fedavgm" else [np.full_like(x, tau * tau) for x in m]
  for x, delta, got in history:
    if name == "fedavgm":
      v = [fl.server_momentum * v_ + d for v_, d in zip(v, delta)]
      expected = [x_ + fl.fedavgm_lr * v_ for x_, v_ in zip(x, v)]
    else:
      m = [b1 * m_ + (1 - b1) * d for m_, d in zip(m, delta)]
      if name == "fedadagrad":
        v = [v_ + d * d for v_, d in zip(v, delta)]
      elif name == "fedyogi":
        v = [v_ - (1 - b2) * d * d * np.sign(v_ - d * d) for v_, d in zip(v, delta)]
      else:
        v = [b2 * v_ + (1 - b2) * d * d for v_, d in zip(v, delta)]
      expected = [x_ + eta * m_ / (np.sqrt(v_) + tau) for x_, m_, v_ in zip(x, m, v)]
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi", "fedadam"])
def test_official_server_rules(name):
  """The published code's fed_global.py (REFERENCE.md, "Published server rules"), round index t from 0."""
  fl, history = _run_server_rounds(name, server_rule="official")
  tau, b1, b2, eta = fl.server_tau, fl.server_beta1, fl.server_beta2, fl.server_lr
  m, v = None, [np.full_like(x, tau * tau) for x in history[0][0]]
  for t, (x, delta, got) in enumerate(history):
    if name == "fedadagrad":
      m = delta
    else:
      m = delta if t == 0 else [b1 * m_ + (1 - b1) * d for m_, d in zip(m, delta)]
    if name == "fedavgm":
      expected = [x_ + m_ for x_, m_ in zip(x, m)]
    else:
      if name == "fedadagrad":
        v = [v_ + m_ ** 2 for v_, m_ in zip(v, m)]
      elif name == "fedyogi":
        v = [v_ - (1 - b2) * m_ ** 2 * np.sign(v_ - m_ ** 2) for v_, m_ in zip(v, m)]
      else:
        v = [b2 * v_ + (1 - b2) * m_ ** 2 for v_, m_ in zip(v, m)]
      expected = [x_ + eta * m_ / (np.sqrt(v_) + tau) for x_, m_, v_ in zip(x, m, v)]
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def test_official_rules_differ_from_textbook():
  """Not a vacuous option: after 3 rounds the two FedAdam rules give different models."""
  _, textbook = _run_server_rounds("fedadam")
  _, official = _run_server_rounds("fedadam", server_rule="official")
  assert max(np.abs(a - b).max() for a, b in zip(textbook[-1][2], official[-1][2])) > 1e-4


def test_flora_merges_the_exact_stacked_sum():
  server, clients, w, new = _one_round("flora")
  for path in TARGETS:
    expected = _np(lora.get_kernel(server.base, path)) + SCALE * _product_sum(clients, path, w)
    np.testing.assert_allclose(_np(lora.get_kernel(new.base, path)), expected, atol=2e-6)
    fresh = lora.lora_entries(new.lora)[path]
    assert np.all(_np(fresh["b"]) == 0)
    assert not np.allclose(_np(fresh["a"]), _np(lora.lora_entries(server.lora)[path]["a"]))
  _check_head_mean(new, clients, _np(w))


def test_flexlora_svd_of_averaged_updates():
  server, clients, w, new = _one_round("flexlora")
  for path in TARGETS:
    average = SCALE * _product_sum(clients, path, w)
    u, sv, vt = np.linalg.svd(average)
    got = lora.lora_entries(new.lora)[path]
    np.testing.assert_allclose(SCALE * _np(got["a"]) @ _np(got["b"]), (u[:, :RANK] * sv[:RANK]) @ vt[:RANK],
                               atol=1e-5)
    np.testing.assert_array_equal(_np(lora.get_kernel(new.base, path)), _np(lora.get_kernel(server.base, path)))


def test_fedsa_lora_shares_a_and_keeps_b():
  _, algorithm, server, rng = _setup("fedsa_lora")
  states = jax.vmap(algorithm.init_client_state, axis_size=K, in_axes=None)(server)
  clients, w = _clients(server, rng), _weights(rng)
  new, states = algorithm.aggregate(server, clients, w, states)
  entries = lora.lora_entries(clients["lora"])
  for path, got in lora.lora_entries(new.lora).items():
    np.testing.assert_allclose(_np(got["a"]), np.einsum("k,k...->...", _np(w), _np(entries[path]["a"])), atol=1e-6)
    np.testing.assert_array_equal(_np(lora.lora_entries(states["b"])[path]["b"]), _np(entries[path]["b"]))
  # each client restarts from the shared A and its own B
  start = algorithm.client_start(new, jax.tree_util.tree_map(lambda x: x[1], states))
  for path, got in lora.lora_entries(start["lora"]).items():
    np.testing.assert_array_equal(_np(got["a"]), _np(lora.lora_entries(new.lora)[path]["a"]))
    np.testing.assert_array_equal(_np(got["b"]), _np(entries[path]["b"])[1])


def test_fedreg_penalty_is_the_update_norm():
  """mu/2 ||s A B||_F^2 summed over targets, against the explicit [in, out] products."""
  _, algorithm, server, rng = _setup("fedreg", fedreg_mu=0.3)
  one = jax.tree_util.tree_map(lambda x: x[0], _clients(server, rng))
  expected = 0.15 * sum(np.sum((SCALE * _np(e["a"]) @ _np(e["b"])) ** 2) for e in lora.lora_entries(one["lora"]).values())
  assert float(algorithm.regularizer(one, None)) == pytest.approx(expected, rel=1e-5)
  clients, w = _clients(server, rng), _weights(rng)
  new, _ = algorithm.aggregate(server, clients, w, None)  # and FedAvg's aggregate
  for got, leaf in zip(_leaves({"lora": new.lora, "head": new.head}), _leaves(clients)):
    np.testing.assert_allclose(got, np.einsum("k,k...->...", _np(w), leaf), atol=1e-6)


def _residual_accumulation_error(float32_targets: bool, rounds: int = 200, update_scale: float = 2e-4) -> float:
  """Relative error of FRLoRA's accumulated update on a bf16 base after `rounds` small rounds.

  The base is stored in bf16 (weights ~N(0, 0.02^2), whose half-ulp is ~6e-5); each round's
  update is a few 1e-5 per element, as in a real run at small learning rates. The reference
  sums the same updates in float64.
  """
  rng = np.random.default_rng(0)
  algorithm = algorithms.from_config(_config("frlora"))
  base = {"enc": {p[-1]: {"kernel": jnp.asarray(0.02 * rng.normal(size=(D_IN, D_OUT)), jnp.bfloat16)}
                  for p in TARGETS}}
  if float32_targets:
    base = lora.with_kernel_dtype(base, TARGETS, jnp.float32)  # what experiment.initial_server does
  lora0, base = lora.init_pissa(base, {p: (D_IN, D_OUT) for p in TARGETS}, RANK, SCALE)
  head = {"classifier": {"kernel": jnp.zeros((D_OUT, 2)), "bias": jnp.zeros((2,))}}
  server = algorithm.init(ServerState(base=base, lora=lora0, head=head), jax.random.PRNGKey(0))
  start = {p: _np(lora.get_kernel(base, p)) for p in TARGETS}
  total = {p: np.zeros((D_IN, D_OUT)) for p in TARGETS}
  for _ in range(rounds):
    clients, w = _clients(server, rng, noise=update_scale), _weights(rng)
    for path, init in lora.lora_entries(server.lora).items():
      entry = lora.lora_entries(clients["lora"])[path]
      a, b = np.einsum("k,kir->ir", _np(w), _np(entry["a"])), np.einsum("k,kro->ro", _np(w), _np(entry["b"]))
      total[path] += SCALE * (a @ b - _np(init["a"]) @ _np(init["b"]))
    server, _ = algorithm.aggregate(server, clients, w, None)
  errors = [np.linalg.norm(_np(lora.get_kernel(server.base, p)) - start[p] - total[p]) / np.linalg.norm(total[p])
            for p in TARGETS]
  return float(max(errors))


def test_residual_accumulation_is_exact_on_a_bf16_base():
  """FRLoRA on a bf16 base keeps float32 targets: 200 rounds of small updates match a float64 sum, while
  adding them to the bf16 weights themselves loses much of the total update."""
  exact, naive = _residual_accumulation_error(True), _residual_accumulation_error(False)
  print(f"relative error of the accumulated update after 200 rounds: float32 targets {exact:.2e}, "
        f"bf16 targets {naive:.2e}")
  assert exact < 1e-3   # float32's own rounding in s (A B - A0 B0), as in an all-float32 run
  assert naive > 0.2
