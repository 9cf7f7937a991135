"""The interface every federated algorithm implements (think optax / fedjax).

An algorithm is a handful of pure, jittable functions over pytrees. The round
loop calls them in the same order for every algorithm and never branches on
the algorithm's name; an algorithm never knows how clients were executed.

Three kinds of state, three names:
- `ServerState.algorithm_state`: the algorithm's own server state (momentum, control variate, ...).
- client states: what each client keeps between rounds (`init_client_state`), stacked over
  clients in the run state and passed to `aggregate` for the round's clients.
- client context: what a client's loss / gradient hooks read during local training
  (`client_context`, e.g. SCAFFOLD's correction c - c_i).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ServerState:
  """The global model (frozen base, FRLoRA's residual; global LoRA; head) and the algorithm's own state."""
  base: Any
  lora: Any
  head: Any
  algorithm_state: Any = None


class Algorithm(NamedTuple):
  """Pure functions over pytrees that define one federated algorithm.

  - lora_init / freeze_a: settings the algorithm fixes ('pissa' | 'kaiming'; True | False),
    or None to leave them to config.lora (see `lora_settings`).
  - init(server, key) -> server: add `algorithm_state` (key: the run's initialisation stream).
  - init_client_state(server) -> one client's persistent state, or None if stateless.
  - client_start(server, client_state) -> the trainable tree {"lora", "head"} a client trains from.
  - client_context(server, client_state) -> what the client's `regularizer` / `grad_correction`
    read as `client_input.context` during local training (None if nothing).
  - aggregate(server, client_trainables, weights, client_states) -> (server, client_states):
    client_trainables / client_states are stacked over the round's clients; weights sum to 1.
  - eval_trees(server) -> (base, lora, head): the global model to evaluate.
  - personal_trees(server, client_state) -> (base, lora, head): a client's own model, for
    algorithms that personalise (evaluated per client as well), or None.
  - regularizer(trainable, client_input) -> scalar added to the local loss, or None.
  - grad_correction(grads, client_input) -> grads, or None (grads has the trainable tree's shape).
  - updates_base: the rule adds updates to the frozen base every round (FRLoRA's residual,
    FLoRA's merge): its targeted kernels are then kept in float32 whatever the storage dtype,
    so small updates are not rounded away (exact residual accumulation).
  - rank_heterogeneity: how clients of different ranks (config.fl.client_ranks) start: 'truncate'
    (the first r_k components of the global factors, the rest zero) or 'freeze' (the rest kept
    at their global values, untrained); None if the algorithm does not define different ranks.
  - update_ranks(server, client_trainables, ranks) -> the round's clients' new ranks (HetLoRA's
    self-pruning), or None: ranks stay as configured.
  - mean_based: `aggregate` reads the clients' trees only through their weighted mean (FedAvg,
    FedOpt, FFA-LoRA, FRLoRA's factor averaging, ...): client-level DP (privacy.py) is defined.
  - uploads / downloads: the parts a client sends / receives each round ('lora', 'lora_a',
    'lora_b', 'head', 'control', 'lora_stacked'), for the communication accounting.
  """
  name: str
  aggregate: Callable
  lora_init: Optional[str] = None
  freeze_a: Optional[bool] = None
  init: Callable = lambda server, key: server
  init_client_state: Callable = lambda server: None
  client_start: Callable = lambda server, client_state: global_trainable(server)
  client_context: Callable = lambda server, client_state: None
  eval_trees: Callable = lambda server: (server.base, server.lora, server.head)
  personal_trees: Optional[Callable] = None
  regularizer: Optional[Callable] = None
  grad_correction: Optional[Callable] = None
  updates_base: bool = False
  rank_heterogeneity: Optional[str] = None
  mean_based: bool = False
  update_ranks: Optional[Callable] = None
  uploads: tuple = ("lora", "head")
  downloads: tuple = ("lora", "head")


PROJECT_LORA_DEFAULTS = {"init": "kaiming", "freeze_a": False}


def lora_settings(algorithm: Algorithm, lora_config) -> tuple[str, bool]:
  """(init, freeze_a) of a run, by one rule for both settings.

  A setting the algorithm fixes is used; a user value that differs from it is an error
  naming both. A setting it leaves open (None) is the user's (config.lora.init 'auto' and
  config.lora.freeze_a unset mean the project default: kaiming, trained A).
  """
  user = {"init": None if lora_config.init == "auto" else lora_config.init, "freeze_a": lora_config.freeze_a}
  fixed = {"init": algorithm.lora_init, "freeze_a": algorithm.freeze_a}
  resolved = {}
  for field in ("init", "freeze_a"):
    if fixed[field] is not None and user[field] is not None and user[field] != fixed[field]:
      raise ValueError(f"config.lora.{field}={user[field]!r} conflicts with config.fl.algorithm="
                       f"{algorithm.name!r}, which is defined with {field}={fixed[field]!r}; drop the "
                       f"config.lora.{field} override, or pick an algorithm that leaves it open.")
    resolved[field] = next(v for v in (fixed[field], user[field], PROJECT_LORA_DEFAULTS[field]) if v is not None)
  return resolved["init"], bool(resolved["freeze_a"])


def weighted_mean(stacked, weights):
  """sum_k w_k x_k over the leading (clients) axis of every leaf."""
  return jax.tree_util.tree_map(
      lambda x: jnp.tensordot(weights.astype(jnp.float32), x.astype(jnp.float32), axes=1).astype(x.dtype), stacked)


def global_trainable(server: ServerState):
  return {"lora": server.lora, "head": server.head}


def with_trainable(server: ServerState, trainable) -> ServerState:
  return server.replace(lora=trainable["lora"], head=trainable["head"])


def tree_sub(a, b):
  return jax.tree_util.tree_map(lambda x, y: x - y, a, b)


def tree_zeros_like(tree):
  return jax.tree_util.tree_map(jnp.zeros_like, tree)
