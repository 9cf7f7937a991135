"""FRLoRA: residual accumulation of client updates into the base, re-init to PiSSA factors.

Each round every client starts from (W_res, A0, B0, head). The server folds the
aggregated client update into the residual base,

    W_res <- W_res + s * (AGG_k(A_k, B_k) - A0 @ B0),

averages the head, and leaves the global LoRA at (A0, B0): the principal
factors of the *pre-trained* weights, computed once. The global model
W_res + s * A0 @ B0 therefore carries the sum of all rounds' updates, a
higher-rank update than any single LoRA.
"""
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean

AGGREGATIONS = ("factors", "product")


def aggregate_update(a_k, b_k, weights, aggregation: str):
  """AGG_k(A_k, B_k) for stacked factors a_k [K, in, r], b_k [K, r, out]."""
  w = weights.astype(jnp.float32)
  if aggregation == "factors":
    return jnp.tensordot(w, a_k, axes=1) @ jnp.tensordot(w, b_k, axes=1)
  return jnp.einsum("k,kir,kro->io", w, a_k, b_k)


def frlora(*, lora_scale: float, aggregation: str) -> Algorithm:
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"config.fl.aggregation={aggregation!r} is unknown; use one of {AGGREGATIONS}.")

  def aggregate(server, client_trainables, weights, client_states):
    def residual_update(init, clients):
      return lora_scale * (aggregate_update(clients["a"], clients["b"], weights, aggregation) - init["a"] @ init["b"])

    updates = lora_lib.map_targets(residual_update, server.lora, client_trainables["lora"])
    return server.replace(base=lora_lib.add_to_kernels(server.base, updates),
                          head=weighted_mean(client_trainables["head"], weights)), client_states

  # Clients fold the round's update into their residual: the averaged factors suffice for `factors`;
  # `product` needs every sampled client's factors.
  return Algorithm(name="frlora", lora_init="pissa", aggregate=aggregate, updates_base=True,
                   rank_heterogeneity="freeze", mean_based=aggregation == "factors",
                   downloads=("lora", "head") if aggregation == "factors" else ("lora_stacked", "head"))
