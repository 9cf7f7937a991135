"""FlexLoRA (Bai et al. 2024): average the full updates dW_k = s A_k B_k, then re-factor the
average by truncated SVD to the LoRA rank; clients start the next round from those factors.
The SVD runs on the stacked factors (`lora.factors_of_weighted_sum`), never on an [in, out] matrix.
The base is never changed; the global model is W0 + s A B with s A B = SVD_r(sum_k p_k dW_k).
"""
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def flexlora(**_) -> Algorithm:
  def aggregate(server, trainables, weights, client_states):
    client_entries = lora_lib.lora_entries(trainables["lora"])
    entries = {}
    for path, entry in lora_lib.lora_entries(server.lora).items():
      a_k, b_k = client_entries[path]["a"], client_entries[path]["b"]
      a, b = lora_lib.factors_of_weighted_sum(a_k.astype(jnp.float32), b_k.astype(jnp.float32),
                                              weights.astype(jnp.float32), entry["a"].shape[1])
      entries[path] = {"a": a.astype(entry["a"].dtype), "b": b.astype(entry["b"].dtype)}
    return server.replace(lora=lora_lib.from_entries(entries),
                          head=weighted_mean(trainables["head"], weights)), client_states

  return Algorithm(name="flexlora", lora_init="kaiming", freeze_a=None, aggregate=aggregate)
