"""FedEx-LoRA, RoLoRA and FedSVD against NumPy transcriptions of their published rules (REFERENCE.md,
"Newer methods"), on the synthetic server and clients of test_server_rules, plus one real round each."""
import jax
import numpy as np
import pytest

from frlora_jax import experiment, lora
from test_server_rules import SCALE, _clients, _np, _setup, _weights


def _entries(tree):
  return lora.lora_entries(tree)


def test_fedex_lora_averages_factors_and_folds_the_exact_residual_into_the_base():
  _, algorithm, server, rng = _setup("fedex_lora")
  clients, w = _clients(server, rng), _np(_weights(rng))
  new, _ = algorithm.aggregate(server, clients, jax.numpy.asarray(w, jax.numpy.float32), None)
  for path, c in _entries(clients["lora"]).items():
    a_k, b_k = _np(c["a"]), _np(c["b"])
    a_avg, b_avg = np.einsum("k,kir->ir", w, a_k), np.einsum("k,kro->ro", w, b_k)
    exact = np.einsum("k,kir,kro->io", w, a_k, b_k)
    got = _entries(new.lora)[path]
    np.testing.assert_allclose(_np(got["a"]), a_avg, atol=1e-6)
    np.testing.assert_allclose(_np(got["b"]), b_avg, atol=1e-6)
    w0 = _np(lora.get_kernel(server.base, path))
    np.testing.assert_allclose(_np(lora.get_kernel(new.base, path)), w0 + SCALE * (exact - a_avg @ b_avg), atol=1e-5)
    # the global model carries the exact average update
    np.testing.assert_allclose(_np(lora.get_kernel(new.base, path)) + SCALE * a_avg @ b_avg,
                               w0 + SCALE * exact, atol=1e-5)
  assert algorithm.updates_base


def test_rolora_alternates_b_then_a():
  _, algorithm, server, rng = _setup("rolora")
  for round_index, trained in enumerate("bab"):
    context = algorithm.client_context(server, None)
    assert bool(context["train_a"]) == (trained == "a")
    grads = jax.tree_util.tree_map(lambda x: x + 1.0, {"lora": server.lora, "head": server.head})
    corrected = algorithm.grad_correction(grads, type("Client", (), {"context": context})())
    for path, g in _entries(corrected["lora"]).items():
      frozen = "b" if trained == "a" else "a"
      assert not np.any(_np(g[frozen])) and np.all(_np(g[trained]) != 0)
    clients, w = _clients(server, rng), _weights(rng)
    new, _ = algorithm.aggregate(server, clients, w, None)
    for path, c in _entries(clients["lora"]).items():
      got, kept = _entries(new.lora)[path], _entries(server.lora)[path]
      np.testing.assert_allclose(_np(got[trained]), np.einsum("k,k...->...", _np(w), _np(c[trained])), atol=1e-6)
      np.testing.assert_array_equal(_np(got["b" if trained == "a" else "a"]), _np(kept["b" if trained == "a" else "a"]))
    server = new


def test_fedsvd_refactors_with_orthonormal_a():
  _, algorithm, server, rng = _setup("fedsvd")
  assert algorithm.freeze_a
  clients, w = _clients(server, rng), _weights(rng)
  new, _ = algorithm.aggregate(server, clients, w, None)
  for path, c in _entries(clients["lora"]).items():
    a = _np(_entries(server.lora)[path]["a"])
    b_avg = np.einsum("k,kro->ro", _np(w), _np(c["b"]))
    u, s, vt = np.linalg.svd(a @ b_avg, full_matrices=False)
    r = a.shape[1]
    got = _entries(new.lora)[path]
    np.testing.assert_allclose(_np(got["a"]).T @ _np(got["a"]), np.eye(r), atol=1e-5)  # orthonormal A
    np.testing.assert_allclose(_np(got["a"]) @ _np(got["b"]), a @ b_avg, atol=1e-5)     # same update
    # A spans the top-r input-side singular vectors (up to sign), B = S V^T
    np.testing.assert_allclose(np.abs(_np(got["a"]).T @ u[:, :r]), np.eye(r), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(_np(got["b"]), axis=1), s[:r], rtol=1e-4)


@pytest.mark.parametrize("name", ["fedex_lora", "rolora", "fedsvd"])
def test_a_real_round_runs_and_changes_the_model(make_config, name):
  exp = experiment.build(make_config(**{"fl.algorithm": name}))
  state = exp.init_state()
  new, record = experiment.run_round(exp, state, 0)
  assert np.isfinite(record["train_loss"])
  before = jax.tree_util.tree_leaves(state.server.lora)
  after = jax.tree_util.tree_leaves(new.server.lora)
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(before, after))
