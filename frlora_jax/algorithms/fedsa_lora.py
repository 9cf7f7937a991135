"""FedSA-LoRA (Guo et al. 2025): A is shared and averaged; each client keeps its own B.

The head is averaged like A. The global model reported in `eval` is (A, mean_k B_k);
`eval_personal` averages the metric of every client's own model (A, B_k) on the same
eval set, the setting the method is designed for.
"""
from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean, with_trainable


def _b_only(lora):
  return lora_lib.split_factors(lora, "a")[0]


def _with_own_b(lora, own_b):
  return lora_lib.map_lora(lambda shared, own: {"a": shared["a"], "b": own["b"]}, lora, own_b)


def fedsa_lora() -> Algorithm:
  def init_client_state(server):
    return {"b": _b_only(server.lora)}

  def client_start(server, client_state):
    return {"lora": _with_own_b(server.lora, client_state["b"]), "head": server.head}

  def aggregate(server, client_trainables, weights, client_states):
    # A averaged; the mean B is kept only for the global eval model
    return with_trainable(server, weighted_mean(client_trainables, weights)), {"b": _b_only(client_trainables["lora"])}

  def personal_trees(server, client_state):
    return server.base, _with_own_b(server.lora, client_state["b"]), server.head

  return Algorithm(name="fedsa_lora", aggregate=aggregate, init_client_state=init_client_state,
                   client_start=client_start, personal_trees=personal_trees,
                   uploads=("lora_a", "head"), downloads=("lora_a", "head"))
