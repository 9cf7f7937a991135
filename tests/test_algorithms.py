"""FRLoRA end to end: one real round equals a NumPy transcription (the rules alone: test_server_rules.py)."""
import numpy as np
import pytest

from frlora_jax import experiment, lora


def _round(make_config, **overrides):
  config = make_config(**overrides)
  exp = experiment.build(config)
  state = exp.init_state()
  updates = experiment.local_updates(exp, state, 0)
  new_state = experiment.server_update(exp, state, updates)
  return exp, state, updates, new_state.server


def _np(x):
  return np.asarray(x, np.float64)


def _clients(updates):
  entries = lora.lora_entries(updates.output.trainable["lora"])
  return entries, _np(updates.weights)


def _weights(exp, weighting):
  counts = exp.client_counts.astype(np.float64)
  return counts / counts.sum() if weighting == "data_size" else np.full(len(counts), 1 / len(counts))


def _check_head(updates, server, w):
  for key in ("kernel", "bias"):
    expected = np.einsum("k,k...->...", w, _np(updates.output.trainable["head"]["classifier"][key]))
    np.testing.assert_allclose(_np(server.head["classifier"][key]), expected, atol=1e-6)


@pytest.mark.parametrize("aggregation, weighting", [("factors", "data_size"), ("product", "uniform")])
def test_frlora_round_matches_numpy(make_config, aggregation, weighting):
  exp, state, updates, server = _round(make_config, **{"fl.algorithm": "frlora", "fl.aggregation": aggregation,
                                                       "fl.weighting": weighting})
  entries, w = _clients(updates)
  np.testing.assert_allclose(w, _weights(exp, weighting), rtol=1e-6)
  s = lora.scale(exp.config.lora)
  for path, init in lora.lora_entries(state.server.lora).items():
    a_k, b_k = _np(entries[path]["a"]), _np(entries[path]["b"])
    if aggregation == "factors":
      agg = np.einsum("k,kir->ir", w, a_k) @ np.einsum("k,kro->ro", w, b_k)
    else:
      agg = sum(w[k] * a_k[k] @ b_k[k] for k in range(len(w)))
    expected = _np(lora.get_kernel(state.server.base, path)) + s * (agg - _np(init["a"]) @ _np(init["b"]))
    np.testing.assert_allclose(_np(lora.get_kernel(server.base, path)), expected, atol=2e-6)
    # re-init: the global LoRA stays at the PiSSA factors of the pre-trained weights
    np.testing.assert_array_equal(_np(lora.lora_entries(server.lora)[path]["a"]), _np(init["a"]))
  _check_head(updates, server, w)


def test_frlora_pissa_factors_come_from_pretrained_weights(make_config):
  exp, state, _, _ = _round(make_config)
  from frlora_jax import models
  pretrained = models.load_classifier(exp.config.model.name, exp.data.num_labels).params
  for path, init in lora.lora_entries(state.server.lora).items():
    w0 = _np(lora.get_kernel(pretrained, path))
    u, sv, vt = np.linalg.svd(w0, full_matrices=False)
    r = init["a"].shape[1]
    np.testing.assert_allclose(lora.scale(exp.config.lora) * _np(init["a"]) @ _np(init["b"]),
                               (u[:, :r] * sv[:r]) @ vt[:r], atol=1e-5)


def test_frozen_a_makes_aggregations_coincide(make_config):
  kernels = {}
  for aggregation in ("factors", "product"):
    _, state, updates, server = _round(make_config, **{"fl.aggregation": aggregation, "lora.freeze_a": True})
    entries, _ = _clients(updates)
    for path, init in lora.lora_entries(state.server.lora).items():
      np.testing.assert_array_equal(_np(entries[path]["a"]), np.broadcast_to(_np(init["a"]), entries[path]["a"].shape))
    kernels[aggregation] = {p: _np(lora.get_kernel(server.base, p)) for p in lora.lora_entries(state.server.lora)}
  for path in kernels["factors"]:
    np.testing.assert_allclose(kernels["factors"][path], kernels["product"][path], atol=1e-6)
