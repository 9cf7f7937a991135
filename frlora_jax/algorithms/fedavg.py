"""FedAvg on LoRA (FedIT): average A, B and the head with the client weights."""
from frlora_jax.algorithms.base import Algorithm, weighted_mean, with_trainable


def fedavg() -> Algorithm:
  def aggregate(server, client_trainables, weights, client_states):
    return with_trainable(server, weighted_mean(client_trainables, weights)), client_states

  return Algorithm(name="fedavg", aggregate=aggregate, mean_based=True)
