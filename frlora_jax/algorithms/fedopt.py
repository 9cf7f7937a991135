"""Server optimizers: optax transformations of the pseudo-gradient g = x - mean_k(y_k).

x is the global trainable tree (LoRA factors and head), y_k the clients' trained trees, and
Delta = -g the round's average client update. Any optax optimizer is a server rule through
`server_optimizer(name, tx)`; the federated ones (Reddi et al. 2021) are:

textbook (default; Reddi et al., no bias correction, v0 = tau^2):
  fedavgm:    v <- beta v + Delta;                       x <- x + eta_s v       (optax.sgd with momentum)
  fedadagrad: m <- b1 m + (1-b1) Delta; v <- v + Delta^2;             x <- x + eta m / (sqrt(v) + tau)
  fedyogi:    m likewise; v <- v - (1-b2) Delta^2 sign(v - Delta^2); x likewise
  fedadam:    m likewise; v <- b2 v + (1-b2) Delta^2;                x likewise
official (the FRLoRA / OpenFedLLM code's `fed_global.py`, config.fl.server_rule='official'):
  fedavgm:    m <- Delta on the first round, then b1 m + (1-b1) Delta;  x <- x + m (step 1)
  fedadagrad: m <- Delta (no first moment); v <- v + m^2;               x <- x + eta m / (sqrt(v) + tau)
  fedyogi:    m as fedavgm's; v <- v - (1-b2) m^2 sign(v - m^2);        x likewise
  fedadam:    m as fedavgm's; v <- b2 v + (1-b2) m^2;                   x likewise
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from frlora_jax.algorithms.base import Algorithm, global_trainable, tree_sub, weighted_mean, with_trainable

SERVER_RULES = ("textbook", "official")
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam")
FIRST_MOMENTS = ("ema", "ema_from_first", "none")

SECOND_MOMENTS = {
    "fedadagrad": lambda v, sq, b2: v + sq,
    "fedyogi": lambda v, sq, b2: v - (1 - b2) * sq * jnp.sign(v - sq),
    "fedadam": lambda v, sq, b2: b2 * v + (1 - b2) * sq,
}


class ServerMomentsState(NamedTuple):
  count: jax.Array  # rounds seen
  m: Any
  v: Any            # None without a second moment


def server_moments(*, first_moment: str, second_moment: Optional[str] = None, square_of: str = "gradient",
                   b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> optax.GradientTransformation:
  """The direction m, or m / (sqrt(v) + tau), of the federated server optimizers (before the step size).

  first_moment: 'ema' (m0 = 0), 'ema_from_first' (m = g on the first round) or 'none' (m = g);
  second_moment: a key of SECOND_MOMENTS or None, with v0 = tau^2, accumulating the square of
  the gradient ('gradient', textbook) or of m ('moment', the published code).
  """
  if first_moment not in FIRST_MOMENTS:
    raise ValueError(f"first_moment={first_moment!r}; use one of {FIRST_MOMENTS}.")

  def init(params):
    v = None if second_moment is None else jax.tree_util.tree_map(lambda p: jnp.full_like(p, tau * tau), params)
    return ServerMomentsState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params), v)

  def update(g, state, params=None):
    del params
    ema = lambda m, x: b1 * m + (1 - b1) * x
    if first_moment == "ema":
      m = jax.tree_util.tree_map(ema, state.m, g)
    elif first_moment == "ema_from_first":
      m = jax.tree_util.tree_map(lambda m_, x: jnp.where(state.count == 0, x, ema(m_, x)), state.m, g)
    else:
      m = g
    if second_moment is None:
      return m, ServerMomentsState(state.count + 1, m, None)
    squared = m if square_of == "moment" else g
    v = jax.tree_util.tree_map(lambda v_, x: SECOND_MOMENTS[second_moment](v_, x * x, b2), state.v, squared)
    direction = jax.tree_util.tree_map(lambda m_, v_: m_ / (jnp.sqrt(v_) + tau), m, v)
    return direction, ServerMomentsState(state.count + 1, m, v)

  return optax.GradientTransformation(init, update)


def fedavgm_transform(rule: str, *, lr: float, momentum: float, b1: float) -> optax.GradientTransformation:
  if rule == "official":
    return optax.chain(server_moments(first_moment="ema_from_first", b1=b1), optax.scale(-1.0))
  return optax.sgd(lr, momentum=momentum)


def adaptive_transform(name: str, rule: str, *, lr: float, b1: float, b2: float,
                       tau: float) -> optax.GradientTransformation:
  if rule == "official":
    first = "none" if name == "fedadagrad" else "ema_from_first"
    moments = server_moments(first_moment=first, second_moment=name, square_of="moment", b1=b1, b2=b2, tau=tau)
  else:
    moments = server_moments(first_moment="ema", second_moment=name, square_of="gradient", b1=b1, b2=b2, tau=tau)
  return optax.chain(moments, optax.scale(-lr))


def server_optimizer(name: str, tx: optax.GradientTransformation) -> Algorithm:
  """FedAvg's client phase, with the server step `tx` applied to the pseudo-gradient."""
  def init(server, key):
    return server.replace(algorithm_state=tx.init(global_trainable(server)))

  def aggregate(server, client_trainables, weights, client_states):
    x = global_trainable(server)
    pseudo_gradient = tree_sub(x, weighted_mean(client_trainables, weights))
    updates, opt_state = tx.update(pseudo_gradient, server.algorithm_state, x)
    return with_trainable(server, optax.apply_updates(x, updates)).replace(algorithm_state=opt_state), client_states

  return Algorithm(name=name, aggregate=aggregate, init=init, mean_based=True)


def from_fl_config(name: str, fl) -> Algorithm:
  """fedavgm / fedadagrad / fedyogi / fedadam with config.fl's hyperparameters and rule."""
  if fl.server_rule not in SERVER_RULES:
    raise ValueError(f"config.fl.server_rule={fl.server_rule!r} is unknown; use one of {', '.join(SERVER_RULES)}.")
  if name == "fedavgm":
    tx = fedavgm_transform(fl.server_rule, lr=fl.fedavgm_lr, momentum=fl.server_momentum, b1=fl.server_beta1)
  else:
    tx = adaptive_transform(name, fl.server_rule, lr=fl.server_lr, b1=fl.server_beta1, b2=fl.server_beta2,
                            tau=fl.server_tau)
  return server_optimizer(name, tx)
