"""FedAvg on LoRA (FedIT): average A, B and the head with the client weights."""
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def fedavg(**_) -> Algorithm:
  def aggregate(server, trainables, weights, client_states):
    avg = weighted_mean(trainables, weights)
    return server.replace(lora=avg["lora"], head=avg["head"]), client_states

  return Algorithm(name="fedavg", lora_init="kaiming", freeze_a=None, aggregate=aggregate)
