"""FLoRA (Wang et al. 2024): stack client factors along the rank axis, so the global update is
exactly the weighted sum of the client products:

    A_stack = [p_1 A_1 | ... | p_K A_K]  (in x K r),   B_stack = [B_1; ...; B_K]  (K r x out)
    A_stack @ B_stack = sum_k p_k A_k B_k.

The stacked update is merged into the base every round and every client starts the next
round from a fresh LoRA (A random, B zero), drawn from the run's initialisation stream and
the round.
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
  shapes = lora_lib.map_targets(lambda e: (e["a"].shape[0], e["b"].shape[1]), lora)
  return lora_lib.init_kaiming(key, shapes, lora_lib.rank_of(lora))


def flora(*, lora_scale: float) -> Algorithm:
  def init(server, key):
    return server.replace(algorithm_state={"key": key, "round": jnp.zeros((), jnp.int32)})

  def aggregate(server, client_trainables, weights, client_states):
    def stacked_update(clients):
      a_stack, b_stack = stack_factors(clients["a"], clients["b"], weights.astype(jnp.float32))
      return lora_scale * a_stack @ b_stack

    round_ = server.algorithm_state["round"] + 1
    key = server.algorithm_state["key"]
    return server.replace(
        base=lora_lib.add_to_kernels(server.base, lora_lib.map_targets(stacked_update, client_trainables["lora"])),
        lora=fresh_lora(jax.random.fold_in(key, round_), server.lora),
        head=weighted_mean(client_trainables["head"], weights),
        algorithm_state={"key": key, "round": round_}), client_states

  # Clients download the stacked factors of every sampled client (to merge them locally).
  return Algorithm(name="flora", lora_init="kaiming", aggregate=aggregate, init=init, updates_base=True,
                   rank_heterogeneity="truncate",
                   downloads=("lora_stacked", "head"))
