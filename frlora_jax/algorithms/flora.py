"""FLoRA (Wang et al. 2024): stack client factors along the rank axis, so the global update is
exactly the weighted sum of the client products:

    A_stack = [p_1 A_1 | ... | p_K A_K]  (in x K r),   B_stack = [B_1; ...; B_K]  (K r x out)
    A_stack @ B_stack = sum_k p_k A_k B_k.

The stacked update is merged into the base every round and every client starts the next
round from a fresh LoRA (A random, B zero), drawn from the server's key and the round.
"""
import jax
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def stack_factors(a_k, b_k, weights):
  """(A_stack [in, K r], B_stack [K r, out]) from a_k [K, in, r], b_k [K, r, out]."""
  k, d_in, r = a_k.shape
  a_stack = jnp.transpose(a_k * weights[:, None, None], (1, 0, 2)).reshape(d_in, k * r)
  return a_stack, b_k.reshape(k * r, -1)


def fresh_lora(key, lora):
  """Kaiming A and zero B with the shapes of `lora`."""
  entries = lora_lib.lora_entries(lora)
  targets = {path: (e["a"].shape[0], e["b"].shape[1]) for path, e in entries.items()}
  rank = next(iter(entries.values()))["a"].shape[1]
  return lora_lib.init_kaiming(key, targets, rank)


def flora(*, lora_scale: float, config, **_) -> Algorithm:
  def init(server):
    return server.replace(extra={"key": jax.random.PRNGKey(config.seed + 1), "round": jnp.zeros((), jnp.int32)})

  def aggregate(server, trainables, weights, client_states):
    client_entries = lora_lib.lora_entries(trainables["lora"])
    kernels = {}
    for path in lora_lib.lora_entries(server.lora):
      a_stack, b_stack = stack_factors(client_entries[path]["a"], client_entries[path]["b"], weights.astype(jnp.float32))
      w = lora_lib.get_kernel(server.base, path)
      kernels[path] = (w.astype(jnp.float32) + lora_scale * a_stack @ b_stack).astype(w.dtype)
    round_ = server.extra["round"] + 1
    lora = fresh_lora(jax.random.fold_in(server.extra["key"], round_), server.lora)
    return server.replace(base=lora_lib.replace_kernels(server.base, kernels), lora=lora,
                          head=weighted_mean(trainables["head"], weights),
                          extra={"key": server.extra["key"], "round": round_}), client_states

  # Clients download the stacked factors of every sampled client (to merge them locally).
  return Algorithm(name="flora", lora_init="kaiming", freeze_a=None, aggregate=aggregate, init=init,
                   downloads=("lora_stacked", "head"))
