"""FedProx: FedAvg with a proximal term mu/2 ||theta - theta_global||^2 in every local loss.

theta is the trainable tree (LoRA factors and head); theta_global is where the client
started this round.
"""
import jax
import jax.numpy as jnp

from frlora_jax.algorithms.base import Algorithm
from frlora_jax.algorithms.fedavg import fedavg


def proximal_term(trainable, anchor, mu: float):
  squares = jax.tree_util.tree_map(lambda x, y: jnp.sum(jnp.square(x - y)), trainable, anchor)
  return 0.5 * mu * sum(jax.tree_util.tree_leaves(squares))


def fedprox(*, mu: float) -> Algorithm:
  if mu < 0:
    raise ValueError(f"config.fl.prox_mu={mu} must be >= 0.")
  return fedavg()._replace(name="fedprox",
                           regularizer=lambda trainable, client: proximal_term(trainable, client.start, mu))
