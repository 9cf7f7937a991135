"""HetLoRA (Cho et al., EMNLP 2024): clients of different LoRA ranks, one global rank-r_max LoRA.

- Client k trains the first r_k components of the global factors (`ranks.py`, 'truncate'):
  its factors arrive zero-padded to r_max.
- Sparsity-weighted aggregation: A and B are each averaged with weights proportional to the
  size of the client's update, S_k = sum over targets of ||A_k B_k||_F (data sizes play no part).
- Optional rank self-pruning (prune_gamma < 1): local training adds
  lambda * sum over targets ||A_tail|| ||B_tail||, the tail being the components from
  floor(gamma r_k) to r_k; a client whose tail norm shrank during the round continues at rank
  max(1, floor(gamma r_k)) (this project's reading of the paper: the client decides from its own
  round, the server only records the rank).
"""
import jax
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax import ranks as ranks_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def update_norm(lora) -> jax.Array:
  """S_k: sum over targets of ||A B||_F (from lora.product_squared_norm: no [in, out] product is formed)."""
  return sum(lora_lib.map_targets(lambda e: jnp.sqrt(jnp.maximum(lora_lib.product_squared_norm(e), 0.0)),
                                  lora).values())


def pruned_rank(rank, gamma: float):
  return jnp.maximum(1, jnp.floor(gamma * rank).astype(jnp.int32))


def tail_norm(lora, rank, gamma: float, max_rank: int) -> jax.Array:
  """sum over targets of ||A_tail||_F ||B_tail||_F, the tail being components floor(gamma r) .. r-1."""
  tail = ranks_lib.tail(lora, ranks_lib.masks(rank, max_rank), ranks_lib.masks(pruned_rank(rank, gamma), max_rank))
  return sum(lora_lib.map_targets(lambda e: _norm(e["a"]) * _norm(e["b"]), tail).values())


def _norm(x):
  """||x||_F with a zero (not NaN) gradient at x = 0, where every round-1 tail starts (B = 0)."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))) + 1e-30)


def hetlora(*, prune_gamma: float = 1.0, prune_lambda: float = 0.0) -> Algorithm:
  if not 0.0 < prune_gamma <= 1.0:
    raise ValueError(f"config.fl.hetlora_prune_gamma={prune_gamma} must be in (0, 1] (1: no pruning).")
  if prune_lambda < 0.0:
    raise ValueError(f"config.fl.hetlora_prune_lambda={prune_lambda} must be >= 0.")
  pruning = prune_gamma < 1.0

  def aggregate(server, client_trainables, weights, client_states):
    sizes = jax.vmap(update_norm)(client_trainables["lora"])
    sparsity_weights = sizes / jnp.maximum(sizes.sum(), 1e-30)
    return server.replace(lora=weighted_mean(client_trainables["lora"], sparsity_weights),
                          head=weighted_mean(client_trainables["head"], weights)), client_states

  def regularizer(trainable, client):
    rank = jnp.sum(client.rank_mask).astype(jnp.int32)
    return prune_lambda * tail_norm(trainable["lora"], rank, prune_gamma, client.rank_mask.shape[-1])

  def update_ranks(server, client_trainables, client_ranks):
    """The round's clients' ranks after self-pruning: shrink where the tail norm went down this round."""
    max_rank = lora_lib.rank_of(server.lora)

    def one(lora, rank):
      start = ranks_lib.mask_lora(server.lora, ranks_lib.masks(rank, max_rank))
      shrank = tail_norm(lora, rank, prune_gamma, max_rank) < tail_norm(start, rank, prune_gamma, max_rank)
      return jnp.where(shrank, pruned_rank(rank, prune_gamma), rank).astype(client_ranks.dtype)

    return jax.vmap(one)(client_trainables["lora"], client_ranks)

  return Algorithm(name="hetlora", aggregate=aggregate, lora_init="kaiming", rank_heterogeneity="truncate",
                   regularizer=regularizer if pruning and prune_lambda > 0 else None,
                   update_ranks=update_ranks if pruning else None)
