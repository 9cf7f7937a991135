"""FlexLoRA (Bai et al. 2024): average the full updates dW_k = s A_k B_k, then re-factor the
average by truncated SVD to the LoRA rank; clients start the next round from those factors.
The SVD runs on the stacked factors (`lora.factors_of_weighted_sum`), never on an [in, out] matrix.
The base is never changed; the global model is W0 + s A B with s A B = SVD_r(sum_k p_k dW_k).
"""
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def flexlora() -> Algorithm:
  def aggregate(server, client_trainables, weights, client_states):
    def refactor(current, clients):
      f32 = jnp.float32
      a, b = lora_lib.factors_of_weighted_sum(clients["a"].astype(f32), clients["b"].astype(f32), weights.astype(f32),
                                              current["a"].shape[1])
      return {"a": a.astype(current["a"].dtype), "b": b.astype(current["b"].dtype)}

    return server.replace(lora=lora_lib.map_lora(refactor, server.lora, client_trainables["lora"]),
                          head=weighted_mean(client_trainables["head"], weights)), client_states

  return Algorithm(name="flexlora", aggregate=aggregate, rank_heterogeneity="truncate")
