"""Server optimizers on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

Delta = mean_k(y_k) - x is the round's average client update of the trainable tree.
  fedavgm:    v <- beta v + Delta;                        x <- x + eta_s v
  fedadagrad: m <- b1 m + (1-b1) Delta; v <- v + Delta^2;            x <- x + eta m / (sqrt(v) + tau)
  fedyogi:    m likewise; v <- v - (1-b2) Delta^2 sign(v - Delta^2); x likewise
  fedadam:    m likewise; v <- b2 v + (1-b2) Delta^2;                x likewise
(no bias correction, v starts at tau^2, as in the paper). Hyperparameters:
config.fl.server_lr (eta), fedavgm_lr (eta_s), server_momentum, server_beta1, server_beta2, server_tau.
"""
import jax
import jax.numpy as jnp

from frlora_jax.algorithms.base import Algorithm, global_trainable, tree_sub, weighted_mean, with_trainable

SECOND_MOMENTS = {
    "fedadagrad": lambda v, d2, b2: v + d2,
    "fedyogi": lambda v, d2, b2: v - (1 - b2) * d2 * jnp.sign(v - d2),
    "fedadam": lambda v, d2, b2: b2 * v + (1 - b2) * d2,
}


def _map(fn, *trees):
  return jax.tree_util.tree_map(fn, *trees)


def fedavgm(*, config, **_) -> Algorithm:
  eta, beta = float(config.fl.fedavgm_lr), float(config.fl.server_momentum)

  def init(server):
    return server.replace(extra={"v": _map(jnp.zeros_like, global_trainable(server))})

  def aggregate(server, trainables, weights, client_states):
    x = global_trainable(server)
    delta = tree_sub(weighted_mean(trainables, weights), x)
    v = _map(lambda v_, d: beta * v_ + d, server.extra["v"], delta)
    return with_trainable(server, _map(lambda x_, v_: x_ + eta * v_, x, v)).replace(extra={"v": v}), client_states

  return Algorithm(name="fedavgm", lora_init="kaiming", freeze_a=None, aggregate=aggregate, init=init)


def adaptive(name: str, *, config, **_) -> Algorithm:
  eta, tau = float(config.fl.server_lr), float(config.fl.server_tau)
  b1, b2 = float(config.fl.server_beta1), float(config.fl.server_beta2)
  second_moment = SECOND_MOMENTS[name]

  def init(server):
    x = global_trainable(server)
    return server.replace(extra={"m": _map(jnp.zeros_like, x), "v": _map(lambda p: jnp.full_like(p, tau * tau), x)})

  def aggregate(server, trainables, weights, client_states):
    x = global_trainable(server)
    delta = tree_sub(weighted_mean(trainables, weights), x)
    m = _map(lambda m_, d: b1 * m_ + (1 - b1) * d, server.extra["m"], delta)
    v = _map(lambda v_, d: second_moment(v_, d * d, b2), server.extra["v"], delta)
    x = _map(lambda x_, m_, v_: x_ + eta * m_ / (jnp.sqrt(v_) + tau), x, m, v)
    return with_trainable(server, x).replace(extra={"m": m, "v": v}), client_states

  return Algorithm(name=name, lora_init="kaiming", freeze_a=None, aggregate=aggregate, init=init)


def fedadagrad(**kw) -> Algorithm:
  return adaptive("fedadagrad", **kw)


def fedyogi(**kw) -> Algorithm:
  return adaptive("fedyogi", **kw)


def fedadam(**kw) -> Algorithm:
  return adaptive("fedadam", **kw)
