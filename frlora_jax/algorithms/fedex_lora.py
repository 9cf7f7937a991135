"""FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation of LoRA updates.

Averaging A and B separately gives (mean B)(mean A), not the mean update sum_k p_k B_k A_k.
FedEx-LoRA keeps the averaged factors as the next round's LoRA and folds the difference into
the frozen base, so the global model carries the exact average:

    W <- W + s * (sum_k p_k A_k B_k - A_avg B_avg),   LoRA <- (A_avg, B_avg)

(this project's layout: kernels [in, out], a [in, r], b [r, out]). Unlike FRLoRA, the LoRA is
not reset: clients continue from the averaged factors.
"""
from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean, with_trainable
from frlora_jax.algorithms.frlora import aggregate_update


def fedex_lora(*, lora_scale: float) -> Algorithm:
  def aggregate(server, client_trainables, weights, client_states):
    averaged = weighted_mean(client_trainables, weights)

    def residual(mean, clients):
      exact = aggregate_update(clients["a"], clients["b"], weights, "product")
      return lora_scale * (exact - mean["a"] @ mean["b"])

    residuals = lora_lib.map_targets(residual, averaged["lora"], client_trainables["lora"])
    server = with_trainable(server, averaged)
    return server.replace(base=lora_lib.add_to_kernels(server.base, residuals)), client_states

  # Clients fold the same residual into their own frozen weights: they need every sampled client's
  # factors (or the full-size residual itself), not only the averages.
  return Algorithm(name="fedex_lora", aggregate=aggregate, updates_base=True, downloads=("lora_stacked", "head"))
