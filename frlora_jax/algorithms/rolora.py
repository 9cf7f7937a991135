"""RoLoRA (2025): alternate which LoRA factor trains and is aggregated, round by round.

Odd rounds (1, 3, ...) train and average only B, even rounds only A, so every aggregate is
exact: with one factor shared, sum_k p_k A B_k = A (sum_k p_k B_k). B goes first because
it starts at zero (PEFT's init), where A's gradient is zero. The frozen factor's gradients
are zeroed (`grad_correction`), and the server keeps its own copy of it, so the round's
aggregate takes only the trained factor from the clients.
"""
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def _trains_a(round_index):
  return round_index % 2 == 1  # rounds completed: 0 -> round 1 trains B


def rolora() -> Algorithm:
  def init(server, key):
    return server.replace(algorithm_state={"round": jnp.zeros((), jnp.int32)})

  def client_context(server, client_state):
    return {"train_a": _trains_a(server.algorithm_state["round"])}

  def grad_correction(grads, client):
    train_a = client.context["train_a"]
    masked = lambda entry: {"a": jnp.where(train_a, entry["a"], 0.0), "b": jnp.where(train_a, 0.0, entry["b"])}
    return {"lora": lora_lib.map_lora(masked, grads["lora"]), "head": grads["head"]}

  def aggregate(server, client_trainables, weights, client_states):
    train_a = _trains_a(server.algorithm_state["round"])
    mean = weighted_mean(client_trainables, weights)
    lora = lora_lib.map_lora(lambda kept, new: {"a": jnp.where(train_a, new["a"], kept["a"]),
                                                "b": jnp.where(train_a, kept["b"], new["b"])}, server.lora, mean["lora"])
    return server.replace(lora=lora, head=mean["head"],
                          algorithm_state={"round": server.algorithm_state["round"] + 1}), client_states

  # One factor travels each way per round: counted as B (the same size as A for square kernels such as q, v).
  return Algorithm(name="rolora", aggregate=aggregate, init=init, client_context=client_context,
                   grad_correction=grad_correction, freeze_a=False, mean_based=True, uploads=("lora_b", "head"),
                   downloads=("lora_b", "head"))
