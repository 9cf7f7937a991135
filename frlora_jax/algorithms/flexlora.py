"""FlexLoRA (Bai et al. 2024): average the full updates dW_k = s A_k B_k, then re-factor the
average by truncated SVD to the LoRA rank; clients start the next round from those factors.
The base is never changed; the global model is W0 + s A B with s A B = SVD_r(sum_k p_k dW_k).
"""
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def flexlora(*, lora_scale: float, **_) -> Algorithm:
  def aggregate(server, trainables, weights, client_states):
    client_entries = lora_lib.lora_entries(trainables["lora"])
    entries = {}
    for path, entry in lora_lib.lora_entries(server.lora).items():
      a_k, b_k = client_entries[path]["a"], client_entries[path]["b"]
      average = lora_scale * jnp.einsum("k,kir,kro->io", weights.astype(jnp.float32), a_k, b_k)
      a, b = lora_lib.pissa_factors(average, entry["a"].shape[1], lora_scale)
      entries[path] = {"a": a.astype(entry["a"].dtype), "b": b.astype(entry["b"].dtype)}
    return server.replace(lora=lora_lib.from_entries(entries),
                          head=weighted_mean(trainables["head"], weights)), client_states

  return Algorithm(name="flexlora", lora_init="kaiming", freeze_a=None, aggregate=aggregate)
