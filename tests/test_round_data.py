"""Round batches drawn on the host: the local update's own draw, prefetched, and no train set on the device."""
import jax
import jax.numpy as jnp
import numpy as np

from frlora_jax import experiment, rng, round_data


def test_rows_are_the_local_updates_draw():
  """Transcription of the in-graph sampling the local update used: per step, rows of the client's indices."""
  indices = [np.arange(0, 50), np.arange(50, 57), np.arange(57, 90)]
  batches = round_data.RoundBatches({"x": np.arange(90)}, indices, seed=3, steps=4, rows_per_step=5)
  ids = np.array([0, 2])
  rows = batches.rows(7, ids)
  assert rows.shape == (2, 4, 5)
  keys = rng.round_keys(3, 7, jnp.asarray(ids))
  for c, client in enumerate(ids):
    for i in range(4):
      k_batch, _ = jax.random.split(jax.random.fold_in(keys[c], i))
      expected = indices[client][np.asarray(jax.random.randint(k_batch, (5,), 0, len(indices[client])))]
      np.testing.assert_array_equal(rows[c, i], expected)
    assert set(rows[c].ravel()) <= set(indices[client])  # a client only ever sees its own rows


def test_prefetched_round_equals_a_fresh_one():
  indices = [np.arange(0, 40), np.arange(40, 90)]
  columns = {"x": np.arange(90) * 10, "y": np.arange(90)[:, None] * np.ones((1, 3), np.int32)}
  batches = round_data.RoundBatches(columns, indices, seed=0, steps=2, rows_per_step=3)
  first = batches.for_round(0, np.array([0, 1]), next_round=(1, np.array([1])))
  prefetched = batches.for_round(1, np.array([1]))
  fresh = round_data.RoundBatches(columns, indices, seed=0, steps=2, rows_per_step=3).for_round(1, np.array([1]))
  assert first["y"].shape == (2, 2, 3, 3)
  for name in columns:
    np.testing.assert_array_equal(np.asarray(prefetched[name]), np.asarray(fresh[name]))
  # a prefetch for other clients than the round asks for is not used
  other = batches.for_round(2, np.array([0]), next_round=(3, np.array([0])))
  np.testing.assert_array_equal(np.asarray(other["x"]), np.asarray(batches._build(2, np.array([0]))["x"]))


def test_no_train_set_on_the_device(make_config):
  """The experiment keeps the train set in host NumPy arrays; a round's inputs are [clients, steps, rows, ...]."""
  config = make_config(**{"fl.num_clients": 4, "fl.clients_per_round": 2, "fl.local_steps": 3})
  exp = experiment.build(config)
  n_train = len(exp.data.train["labels"])
  assert all(isinstance(c, np.ndarray) for c in exp.train_batches.columns.values())
  device_leaves = [x for x in jax.tree_util.tree_leaves(exp.initial_server) if isinstance(x, jax.Array)]
  assert not any(x.ndim and x.shape[0] == n_train for x in device_leaves)
  ids = experiment.sample_clients(config, exp.num_clients, 0)
  batch = exp.train_batches.for_round(0, ids)
  assert batch["input_ids"].shape[:3] == (2, 3, config.optim.batch_size)
  assert batch["input_ids"].shape[3] <= config.data.max_length  # length-bucketed


def test_distinct_rows_are_different_examples_of_the_client_in_a_uniform_order():
  """Sample-level DP's draw: no example twice in a step, every one of the client's examples reachable,
  a client whose size equals the step's rows gets all of them, and none of another client's."""
  indices = [np.arange(0, 6), np.arange(6, 40)]
  batches = round_data.RoundBatches({"x": np.arange(40)}, indices, seed=1, steps=50, rows_per_step=6, distinct=True)
  rows = batches.rows(0, np.array([0, 1]))
  assert all(len(set(step)) == 6 for client in rows for step in client)
  assert all(set(step) == set(range(6)) for step in rows[0])       # 6 of 6: the whole client each step
  assert set(rows[1].ravel()) == set(range(6, 40))                    # 300 draws reach all 34 examples
  counts = np.bincount(rows[1].ravel() - 6, minlength=34)
  assert counts.min() > 0 and counts.max() < 3 * counts.mean()
  small = round_data.RoundBatches({"x": np.arange(40)}, [np.arange(0, 4), np.arange(4, 40)], seed=1, steps=3,
                                  rows_per_step=6, distinct=True).for_round(0, np.array([0, 1]))
  weights = np.asarray(small["example_weights"])
  assert weights.shape == (2, 3, 6) and (weights[0] == [1, 1, 1, 1, 0, 0]).all() and (weights[1] == 1).all()
  assert all(set(step[:4]) == set(range(4)) for step in np.asarray(small["x"])[0])  # its 4 examples, once each
  tiny = round_data.RoundBatches({"x": np.arange(9)}, [np.arange(0, 4), np.arange(4, 9)], seed=0, steps=2,
                                 rows_per_step=6, distinct=True).for_round(0, np.array([0, 1]))
  assert np.asarray(tiny["example_weights"]).sum(-1).tolist() == [[4, 4], [5, 5]]  # no client holds a step
  assert all(set(step[:5]) == set(range(4, 9)) for step in np.asarray(tiny["x"])[1])
  plain = round_data.RoundBatches({"x": np.arange(40)}, indices, seed=1, steps=50, rows_per_step=6).rows(0, np.array([0]))
  assert any(len(set(step)) < 6 for step in plain[0])                 # with replacement, a 6-example client repeats
