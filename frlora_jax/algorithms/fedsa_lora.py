"""FedSA-LoRA (Guo et al. 2025): A is shared and averaged; each client keeps its own B.

The head is averaged like A. The global model reported in `eval` is (A, mean_k B_k);
`eval_personal` averages the metric of every client's own model (A, B_k) on the same
eval set, the setting the method is designed for.
"""
from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def _b_tree(lora):
  return lora_lib.from_entries({p: {"b": e["b"]} for p, e in lora_lib.lora_entries(lora).items()})


def _with_b(lora, b_tree):
  bs = lora_lib.lora_entries(b_tree)
  return lora_lib.from_entries({p: {"a": e["a"], "b": bs[p]["b"]} for p, e in lora_lib.lora_entries(lora).items()})


def fedsa_lora(**_) -> Algorithm:
  def init_client(server):
    return {"b": _b_tree(server.lora)}

  def client_start(server, client_state):
    return {"lora": _with_b(server.lora, client_state["b"]), "head": server.head}

  def aggregate(server, trainables, weights, client_states):
    avg = weighted_mean(trainables, weights)  # A averaged; mean B kept for the global eval model
    return server.replace(lora=avg["lora"], head=avg["head"]), {"b": _b_tree(trainables["lora"])}

  def personal_trees(server, client_state):
    return server.base, _with_b(server.lora, client_state["b"]), server.head

  return Algorithm(name="fedsa_lora", lora_init="kaiming", freeze_a=None, aggregate=aggregate,
                   init_client=init_client, client_start=client_start, personal_trees=personal_trees,
                   uploads=("lora_a", "head"), downloads=("lora_a", "head"))
