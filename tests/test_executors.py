"""vmap (whole and chunked), lax.map and the Python loop give the same client updates."""
import jax
import numpy as np

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
