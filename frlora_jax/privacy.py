"""Differential privacy: DP-SGD inside local training, DP-FedAvg at the server, and their accounting.

config.dp.mode:
- 'sample': example-level DP-SGD on every client (Abadi et al. 2016). Each local step clips every
  example's gradient to dp.clip_norm (L2 over the trained tree), sums them, adds N(0, (sigma C)^2)
  to every coordinate and divides by the step's rows. Examples weigh equally (an LM example's loss
  is its mean over response tokens). The guarantee is per example of a client's data.
- 'client': client-level DP-FedAvg (McMahan et al. 2018). The server clips each client's update
  (trained tree minus the tree it started from) to dp.clip_norm, averages with uniform weights
  over the m clients of the round and adds N(0, (sigma C / m)^2). Defined for algorithms whose
  server rule reads the clients' trees only through their mean (`Algorithm.mean_based`). The
  guarantee is per client (all of its data).

Epsilon at dp.delta comes from Google's `dp-accounting` (RDP accountant) for the Poisson-subsampled
Gaussian mechanism: sampling rate rows/n_k per local step ('sample') or m/K per round ('client').
'sample' steps take rows distinct examples drawn without replacement (round_data.draw_rows), so an
example adds at most one clipped gradient to a step; accounting that fixed-size batch as Poisson
sampling at the same rate is the usual approximation (Opacus without Poisson sampling, TF Privacy),
not an exact bound. A client with fewer examples than rows uses every one of them each step (the
empty rows weigh 0; its sampling rate is 1).
`dp.target_epsilon` > 0 derives sigma before training so that the whole run ends at that epsilon.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "sample", "client")
MAX_NOISE_MULTIPLIER = 1000.0  # beyond this, noise drowns any update: a target needing more is unreachable


def accounting():
  """The dp_accounting module, or a clear error naming the extra that installs it."""
  try:
    import dp_accounting
  except ImportError:
    raise ImportError("config.dp.mode needs Google's dp-accounting for its privacy accountant: "
                      "pip install -e '.[dp]' (or pip install dp-accounting==0.6.0).") from None
  return dp_accounting


# ----- the mechanisms (pure, jittable) -----

def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def clip(tree, clip_norm: float):
  """`tree` scaled to L2 norm <= clip_norm (unchanged if already inside)."""
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(global_norm(tree), 1e-12))
  return jax.tree_util.tree_map(lambda x: (x * factor).astype(x.dtype), tree)


def gaussian_like(tree, key, std):
  """Independent N(0, std^2) for every coordinate of `tree` (float32)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree_util.tree_unflatten(
      treedef, [std * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


@dataclasses.dataclass(frozen=True)
class ClientLevel:
  """DP-FedAvg's server-side settings (hashable: a jit static argument)."""
  clip_norm: float
  noise_multiplier: float
  seed: int                  # the run's seed: the noise key is rng.privacy_key(seed, round)


def privatize_updates(starts, trainables, key, settings: ClientLevel):
  """Clients' trees whose uniform mean is start + mean_k clip(update_k) + N(0, (sigma C / m)^2).

  starts / trainables are stacked over the round's m clients; the same noise is added to every
  client's clipped update, so any mean-based server rule sees exactly DP-FedAvg's noised mean.
  """
  m = jax.tree_util.tree_leaves(trainables)[0].shape[0]
  updates = jax.tree_util.tree_map(lambda t, s: t.astype(jnp.float32) - s.astype(jnp.float32), trainables, starts)
  clipped = jax.vmap(lambda u: clip(u, settings.clip_norm))(updates)
  one = jax.tree_util.tree_map(lambda x: x[0], updates)
  noise = gaussian_like(one, key, settings.noise_multiplier * settings.clip_norm / m)
  return jax.tree_util.tree_map(lambda s, c, z, t: (s.astype(jnp.float32) + c + z[None]).astype(t.dtype),
                                starts, clipped, noise, trainables)


# ----- accounting (host side) -----

def _event(noise_multiplier: float, sampling_rate: float, steps: int):
  dpa = accounting()
  gaussian = dpa.GaussianDpEvent(noise_multiplier)
  event = gaussian if sampling_rate >= 1.0 else dpa.PoissonSampledDpEvent(sampling_rate, gaussian)
  return dpa.SelfComposedDpEvent(event, int(steps))


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
  """Epsilon at `delta` of `steps` Poisson-subsampled Gaussian steps (RDP accountant)."""
  if steps <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return float("inf")
  accountant = accounting().rdp.RdpAccountant()
  accountant.compose(_event(noise_multiplier, sampling_rate, steps))
  return float(accountant.get_epsilon(delta))


def calibrate(target_epsilon: float, sampling_rate: float, steps: int, delta: float) -> float:
  """The smallest noise multiplier whose run ends at <= target_epsilon."""
  dpa = accounting()
  if epsilon(MAX_NOISE_MULTIPLIER, sampling_rate, steps, delta) > target_epsilon:
    raise ValueError(f"config.dp.target_epsilon={target_epsilon} cannot be reached: even noise_multiplier="
                     f"{MAX_NOISE_MULTIPLIER:g} gives more ({steps} steps at sampling rate {sampling_rate:.3g}, "
                     f"delta {delta:g}); raise config.dp.target_epsilon or config.dp.delta, or train fewer steps.")
  return float(dpa.calibrate_dp_mechanism(
      dpa.rdp.RdpAccountant, lambda sigma: _event(sigma, sampling_rate, steps), target_epsilon, delta,
      bracket_interval=dpa.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4))


@dataclasses.dataclass(frozen=True)
class Accountant:
  """Epsilon of a run after any number of rounds, from the clients' participation."""
  mode: str
  noise_multiplier: float
  delta: float
  sampling_rates: tuple        # 'sample': rows per step / n_k for each client; 'client': (m / K,)
  local_steps: int

  def epsilon_after(self, participations: np.ndarray) -> float:
    """'sample': the largest epsilon over clients, client k having trained participations[k] rounds;
    'client': epsilon after participations (a scalar: rounds run)."""
    if self.mode == "client":
      return epsilon(self.noise_multiplier, self.sampling_rates[0], int(participations), self.delta)
    pairs = {(q, int(n) * self.local_steps) for q, n in zip(self.sampling_rates, np.atleast_1d(participations))}
    return max(epsilon(self.noise_multiplier, q, steps, self.delta) for q, steps in pairs)

  def record(self, participations) -> dict:
    return {"mode": self.mode, "epsilon": round(self.epsilon_after(participations), 6), "delta": self.delta,
            "noise_multiplier": self.noise_multiplier}


def sampling_rates(config, client_counts) -> tuple:
  if config.dp.mode == "client":
    m = config.fl.clients_per_round or len(client_counts)
    return (min(1.0, m / len(client_counts)),)
  rows = config.optim.batch_size * config.optim.grad_accum
  return tuple(min(1.0, rows / max(int(n), 1)) for n in client_counts)


def resolve_noise(config, client_counts) -> float:
  """dp.noise_multiplier, or the one that meets dp.target_epsilon after all rounds (worst client)."""
  dp = config.dp
  if dp.target_epsilon <= 0:
    return float(dp.noise_multiplier)
  rates = sampling_rates(config, client_counts)
  steps = config.fl.rounds * (1 if dp.mode == "client" else config.fl.local_steps)
  return calibrate(float(dp.target_epsilon), max(rates), steps, float(dp.delta))


def accountant(config, client_counts, noise_multiplier: float) -> Optional[Accountant]:
  if config.dp.mode == "none":
    return None
  return Accountant(config.dp.mode, float(noise_multiplier), float(config.dp.delta),
                    sampling_rates(config, client_counts), config.fl.local_steps)


def with_resolved_noise(config, client_counts):
  """A copy of `config` whose dp.noise_multiplier is the one the run uses (derived from dp.target_epsilon)."""
  if config.dp.mode == "none" or config.dp.target_epsilon <= 0:
    return config
  resolved = config.copy_and_resolve_references()
  resolved.dp.noise_multiplier = resolve_noise(config, client_counts)
  return resolved


def client_level(config) -> Optional[ClientLevel]:
  if config.dp.mode != "client":
    return None
  return ClientLevel(float(config.dp.clip_norm), float(config.dp.noise_multiplier), int(config.seed))


def check(config, algorithm) -> None:
  """Bad DP settings, before any data is read."""
  dp = config.dp
  if dp.mode not in MODES:
    raise ValueError(f"config.dp.mode={dp.mode!r} is unknown; use one of {', '.join(MODES)}.")
  if dp.mode == "none":
    return
  accounting()
  if dp.clip_norm <= 0:
    raise ValueError(f"config.dp.clip_norm={dp.clip_norm} must be > 0 (the L2 bound of a clipped gradient/update).")
  if dp.noise_multiplier < 0:
    raise ValueError(f"config.dp.noise_multiplier={dp.noise_multiplier} must be >= 0.")
  if dp.target_epsilon < 0:
    raise ValueError(f"config.dp.target_epsilon={dp.target_epsilon} must be > 0 (or 0: use dp.noise_multiplier).")
  if dp.target_epsilon == 0 and dp.noise_multiplier == 0:
    raise ValueError("config.dp.noise_multiplier=0 gives no privacy; set it (e.g. 1.0) or config.dp.target_epsilon.")
  if not 0.0 < dp.delta < 1.0:
    raise ValueError(f"config.dp.delta={dp.delta} must be in (0, 1), e.g. 1e-5 (below 1 / examples per client).")
  if dp.mode == "client":
    if not algorithm.mean_based:
      raise ValueError(f"config.dp.mode='client' (DP-FedAvg) is not defined for config.fl.algorithm="
                       f"{algorithm.name!r}: its server rule reads each client's tree, not only their mean. Use "
                       f"dp.mode='sample', or one of the mean-based algorithms (fedavg, ffa_lora, fedprox, fedreg, "
                       f"fedavgm, fedadagrad, fedyogi, fedadam, frlora, rolora, fedsvd).")
    if config.fl.weighting != "uniform":
      raise ValueError("config.dp.mode='client' averages clipped updates with uniform weights (data sizes are "
                       "private too); set config.fl.weighting='uniform'.")
    if config.fl.client_ranks:
      raise ValueError("config.dp.mode='client' with config.fl.client_ranks is not supported; clear one of them.")
