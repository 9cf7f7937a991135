"""Heterogeneous client ranks: which LoRA rank each client trains, as masks over one padded rank.

Every client's factors are stored at config.lora.rank (r_max), the largest rank, so the
executors still batch clients and compile once. Client k uses the first r_k of the r_max
components: a 0/1 mask over the rank axis ([in, r] A columns, [r, out] B rows) keeps the
others out of its local training. How the masked components start is the algorithm's choice
(`Algorithm.rank_heterogeneity`):

- 'truncate' (FLoRA, FlexLoRA, HetLoRA): the client takes the first r_k components of the
  global factors and zeros the rest, so its update is exactly a rank-r_k LoRA zero-padded to
  r_max (what those papers' servers aggregate).
- 'freeze' (FRLoRA): the client keeps the other components at their global values and does
  not train them, so its starting model is the global model (FRLoRA's PiSSA factors would be
  cut short otherwise) and its update has rank <= r_k.

Every client scales its LoRA by alpha / r_max (config.lora), the same s for all ranks.

config.fl.client_ranks:
  '' (every client at config.lora.rank) | '4,8,16,4,8' (one rank per client) |
  'tiers:4,8,16' (client k gets tier k mod 3) | 'halved:3' (r_max, r_max/2, r_max/4 by tier).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MODES = ("truncate", "freeze")


def _ints(text: str, field: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{field}={text!r}: expected whole numbers separated by commas, e.g. '4,8,16'.") from None


def parse(spec, num_clients: int, max_rank: int, field: str = "config.fl.client_ranks") -> Optional[np.ndarray]:
  """[num_clients] int32 ranks from the spec (see the module docstring), or None for homogeneous ranks."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return None
  if isinstance(spec, (list, tuple)):
    ranks = [int(x) for x in spec]
  elif spec.startswith("tiers:"):
    tiers = _ints(spec[len("tiers:"):], field)
    if not tiers:
      raise ValueError(f"{field}={spec!r} names no tier; e.g. 'tiers:4,8,16'.")
    ranks = [tiers[k % len(tiers)] for k in range(num_clients)]
  elif spec.startswith("halved:"):
    count = _ints(spec[len("halved:"):], field)
    if len(count) != 1 or count[0] < 1:
      raise ValueError(f"{field}={spec!r}: 'halved:T' takes one number of tiers >= 1, e.g. 'halved:3'.")
    ranks = [max(1, max_rank >> (k % count[0])) for k in range(num_clients)]
  else:
    ranks = _ints(spec, field)
    if len(ranks) != num_clients:
      raise ValueError(f"{field}={spec!r} gives {len(ranks)} ranks for {num_clients} clients; give one rank per "
                       f"client, or a rule ('tiers:4,8,16' or 'halved:3').")
  ranks = np.asarray(ranks, np.int32)
  if ranks.min() < 1:
    raise ValueError(f"{field}={spec!r} has a rank below 1; every client needs rank >= 1.")
  if ranks.max() > max_rank:
    raise ValueError(f"{field}={spec!r} has rank {int(ranks.max())} > config.lora.rank={max_rank}: config.lora.rank "
                     f"is the largest (padded) rank; raise it to {int(ranks.max())} or lower the client ranks.")
  return ranks


def check_algorithm(spec, algorithm) -> None:
  """Heterogeneous ranks only for algorithms that define them (FLoRA, FlexLoRA, HetLoRA, FRLoRA)."""
  if spec and algorithm.rank_heterogeneity is None:
    raise ValueError(f"config.fl.client_ranks={spec!r} is set, but config.fl.algorithm={algorithm.name!r} does not "
                     f"define clients with different ranks; use flora, flexlora, hetlora or frlora, or clear "
                     f"config.fl.client_ranks.")
  if spec and algorithm.rank_heterogeneity not in MODES:
    raise ValueError(f"{algorithm.name}: rank_heterogeneity={algorithm.rank_heterogeneity!r}; use one of {MODES}.")


def masks(ranks: jax.Array, max_rank: int) -> jax.Array:
  """[..., max_rank] float32: 1 for the first `rank` components, 0 after."""
  return (jnp.arange(max_rank) < jnp.asarray(ranks)[..., None]).astype(jnp.float32)


def mask_lora(lora, mask: jax.Array):
  """`lora` (or a tree shaped like it: gradients, updates) with A's columns and B's rows outside `mask` zeroed.

  Works on the whole tree or on a part of it (a frozen A is simply absent).
  """
  def masked(path, leaf):
    m = mask.astype(leaf.dtype)
    return leaf * (m[None, :] if path[-1] == "a" else m[:, None])

  flat = traverse_util.flatten_dict(lora)
  return traverse_util.unflatten_dict({path: masked(path, leaf) for path, leaf in flat.items()})


def tail(lora, mask: jax.Array, keep: jax.Array):
  """Only the components kept by `mask` but not by `keep` (HetLoRA's prunable tail)."""
  return mask_lora(lora, mask * (1.0 - keep))
