"""Differential privacy (privacy.py): clipping, noise scale, DP-SGD's step, DP-FedAvg's noised mean, the
accountant against dp-accounting itself, dp.mode='none' untouched, and bad settings."""
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from frlora_jax import client, config_checks, experiment, privacy

CLIP, ROWS = 0.5, 8


def _random_tree(key, scale=1.0):
  k1, k2 = jax.random.split(key)
  return {"lora": {"q": {"a": scale * jax.random.normal(k1, (6, 2)), "b": scale * jax.random.normal(k2, (2, 3))}},
          "head": {}}


def test_clip_bounds_the_norm_and_leaves_small_trees_alone():
  for i, scale in enumerate([0.01, 1.0, 100.0]):
    tree = _random_tree(jax.random.PRNGKey(i), scale)
    clipped = privacy.clip(tree, CLIP)
    norm = float(privacy.global_norm(tree))
    assert float(privacy.global_norm(clipped)) <= CLIP * (1 + 1e-6)
    if norm <= CLIP:
      jax.tree_util.tree_map(np.testing.assert_array_equal, clipped, tree)
    else:  # same direction
      np.testing.assert_allclose(float(privacy.global_norm(clipped)), CLIP, rtol=1e-6)


def _toy_update(noise_multiplier, loss_scale=1.0):
  """DP-SGD local update of a linear model y = s x A B, one step of plain SGD (lr 1), no schedule."""
  def model_loss(trainable, base, batch, rng):
    e = trainable["lora"]["q"]
    pred = (batch["x"] @ e["a"]) @ e["b"]
    return loss_scale * jnp.mean(jnp.sum((pred - batch["y"]) ** 2, -1))

  return client.make_local_update(model_loss, tx=optax.identity(), lora_lr=1.0, head_lr=1.0, freeze_a=False,
                                  local_steps=1, batch_size=ROWS // 2, grad_accum=2, schedule=lambda *a: 1.0,
                                  dp_sample=(CLIP, noise_multiplier)), model_loss


def _client(start, key=0):
  rng = np.random.default_rng(key)
  batches = {"x": jnp.asarray(rng.normal(size=(1, ROWS, 6)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(1, ROWS, 3)), jnp.float32)}
  return client.ClientInput(start=start, rng=jax.random.PRNGKey(key), step0=jnp.int32(0), total_steps=jnp.int32(1),
                            batches=batches)


def test_dp_sgd_step_is_the_mean_of_clipped_per_example_gradients():
  update, model_loss = _toy_update(noise_multiplier=0.0, loss_scale=10.0)
  start = _random_tree(jax.random.PRNGKey(3))
  c = _client(start)
  out = update({"base": {}}, c)
  per_example = []
  for i in range(ROWS):
    example = jax.tree_util.tree_map(lambda x: x[0, i:i + 1], c.batches)
    g = jax.grad(model_loss)(start, {}, example, None)
    assert float(privacy.global_norm(g)) > CLIP  # the clip binds: loss_scale makes every gradient large
    per_example.append(privacy.clip(g, CLIP))
  want = jax.tree_util.tree_map(lambda s, *gs: s - sum(gs) / ROWS, start, *per_example)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), out.trainable, want)
  # every example's contribution is bounded: the step moves at most CLIP
  step = jax.tree_util.tree_map(lambda x, y: x - y, out.trainable, start)
  assert float(privacy.global_norm(step)) <= CLIP + 1e-6


def test_dp_sgd_filler_rows_of_a_small_client_add_nothing():
  """Rows weighted 0 (a client with fewer examples than a step's rows) add no gradient; the sum is still
  divided by the step's rows, a constant."""
  update, model_loss = _toy_update(noise_multiplier=0.0, loss_scale=10.0)
  start = _random_tree(jax.random.PRNGKey(3))
  c = _client(start)
  real = 5
  weighted = c.replace(batches=dict(c.batches, example_weights=jnp.asarray([[1.0] * real + [0.0] * (ROWS - real)])))
  out = update({"base": {}}, weighted)
  examples = [jax.tree_util.tree_map(lambda x: x[0, i:i + 1], c.batches) for i in range(real)]
  per_example = [privacy.clip(jax.grad(model_loss)(start, {}, example, None), CLIP) for example in examples]
  want = jax.tree_util.tree_map(lambda s, *gs: s - sum(gs) / ROWS, start, *per_example)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), out.trainable, want)
  losses = [float(model_loss(start, {}, example, None)) for example in examples]
  np.testing.assert_allclose(float(out.loss), np.mean(losses), rtol=1e-5)  # the loss of the real examples only


def test_dp_sgd_noise_has_the_stated_scale():
  sigma = 3.0
  update, _ = _toy_update(noise_multiplier=sigma)
  quiet, _ = _toy_update(noise_multiplier=0.0)
  start = {"lora": {"q": {"a": jnp.zeros((600, 2)), "b": jnp.zeros((2, 300))}}, "head": {}}
  c = _client({"lora": {"q": {"a": jnp.zeros((6, 2)), "b": jnp.zeros((2, 3))}}, "head": {}})
  c = c.replace(start=start, batches={"x": jnp.zeros((1, ROWS, 600)), "y": jnp.zeros((1, ROWS, 300))})
  noisy = jax.tree_util.tree_leaves(update({"base": {}}, c).trainable)
  clean = jax.tree_util.tree_leaves(quiet({"base": {}}, c.replace(start=start)).trainable)
  noise = np.concatenate([np.ravel(n - q) for n, q in zip(noisy, clean)]) * ROWS  # undo the 1 / rows
  assert abs(noise.mean()) < 0.05 * sigma * CLIP
  np.testing.assert_allclose(noise.std(), sigma * CLIP, rtol=0.05)


def test_dp_fedavg_noised_mean_of_clipped_updates():
  m, sigma = 4, 2.0
  starts = jax.tree_util.tree_map(lambda x: jnp.stack([x] * m), _random_tree(jax.random.PRNGKey(0)))
  trained = jax.tree_util.tree_map(lambda s, k: s + 3.0 * jax.random.normal(jax.random.PRNGKey(k), s.shape), starts,
                                   {"lora": {"q": {"a": 1, "b": 2}}, "head": {}})
  quiet = privacy.privatize_updates(starts, trained, jax.random.PRNGKey(9), privacy.ClientLevel(CLIP, 0.0, 0))
  for k in range(m):  # each client's update clipped
    delta = jax.tree_util.tree_map(lambda q, s: q[k] - s[k], quiet, starts)
    np.testing.assert_allclose(float(privacy.global_norm(delta)), CLIP, rtol=1e-5)
  zeros = {"w": jnp.zeros((m, 200, 200))}  # no update: the clients' mean is pure noise
  noisy = privacy.privatize_updates(zeros, zeros, jax.random.PRNGKey(1), privacy.ClientLevel(CLIP, sigma, 0))
  np.testing.assert_allclose(np.asarray(noisy["w"]).mean(0).std(), sigma * CLIP / m, rtol=0.05)


def test_epsilon_matches_dp_accounting_and_calibration_hits_the_target():
  q, sigma, steps, delta = 0.01, 1.1, 1000, 1e-5
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
  assert privacy.epsilon(sigma, q, steps, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
  assert privacy.epsilon(sigma, q, 2 * steps, delta) > privacy.epsilon(sigma, q, steps, delta)
  for target in (1.0, 3.0, 8.0):
    found = privacy.calibrate(target, q, steps, delta)
    assert privacy.epsilon(found, q, steps, delta) <= target * (1 + 1e-3)
    assert privacy.epsilon(found * 0.98, q, steps, delta) > target  # and not more noise than needed


def _round_outputs(exp, rounds=2):
  state, records = exp.init_state(), []
  for r in range(rounds):
    state, record = experiment.run_round(exp, state, r)
    records.append(record)
  return state, records


def test_dp_mode_none_ignores_the_dp_settings(make_config):
  plain, _ = _round_outputs(experiment.build(make_config()))
  ignored, _ = _round_outputs(experiment.build(make_config(**{"dp.clip_norm": 1e-3, "dp.noise_multiplier": 50.0,
                                                              "dp.target_epsilon": 0.5})))
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain.server.lora, ignored.server.lora)


@pytest.mark.parametrize("mode, algorithm", [("sample", "frlora"), ("client", "fedavg")])
def test_private_runs_log_epsilon(tmp_path, make_config, mode, algorithm):
  config = make_config(**{"fl.algorithm": algorithm, "dp.mode": mode, "dp.target_epsilon": 8.0,
                          "fl.weighting": "uniform", "fl.rounds": 3, "checkpoint_every": 0})
  records = experiment.run(config, str(tmp_path))
  eps = [r["privacy"]["epsilon"] for r in records]
  assert all(b > a for a, b in zip(eps, eps[1:]))               # spent round by round
  assert eps[-1] == pytest.approx(8.0, rel=2e-3)                # the target, reached at the last round
  assert records[-1]["privacy"]["noise_multiplier"] > 0 and all(np.isfinite(r["train_loss"]) for r in records)


@pytest.mark.parametrize("overrides, message", [
    ({"dp.mode": "client", "fl.algorithm": "flora", "fl.weighting": "uniform"}, "not defined for config.fl.algorithm"),
    ({"dp.mode": "client", "fl.algorithm": "fedavg"}, "config.fl.weighting='uniform'"),
    ({"dp.mode": "sample", "dp.delta": 1.5}, "config.dp.delta=1.5"),
    ({"dp.mode": "sample", "dp.clip_norm": 0.0}, "config.dp.clip_norm=0.0"),
    ({"dp.mode": "laplace"}, "config.dp.mode='laplace' is unknown"),
])
def test_bad_dp_settings_are_refused_before_work(make_config, overrides, message):
  with pytest.raises(ValueError, match="config.dp") as info:
    config_checks.check(make_config(**overrides))
  assert message in str(info.value)


def test_an_unreachable_target_epsilon_is_refused(make_config):
  with pytest.raises(ValueError, match="config.dp.target_epsilon=1e-09 cannot be reached"):
    experiment.build(make_config(**{"dp.mode": "sample", "dp.target_epsilon": 1e-9}))
