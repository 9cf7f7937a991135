"""The interface every federated algorithm implements (think optax / fedjax).

An algorithm is a handful of pure, jittable functions over pytrees. The round
loop calls them in the same order for every algorithm and never branches on
the algorithm's name; an algorithm never knows how clients were executed.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ServerState:
  """The global model: frozen base (FRLoRA's residual), global LoRA, head, and the
  algorithm's own server state (momentum, control variates, ...)."""
  base: Any
  lora: Any
  head: Any
  extra: Any = None


class Algorithm(NamedTuple):
  """Pure functions over pytrees that define one federated algorithm.

  - lora_init: 'pissa' or 'kaiming' (the init this algorithm is defined with).
  - freeze_a: True/False forces A frozen/trained in local training; None leaves it
    to config.lora.freeze_a.
  - init(server) -> server: add the algorithm's server-side state.
  - init_client(server) -> pytree: one client's persistent state (None if stateless).
  - client_start(server, client_state) -> trainable {"lora", "head"} to train from.
  - client_payload(server, client_state) -> what the client's local loss/gradient hooks
    see as `client_input.extra` (default: its state).
  - aggregate(server, trainables, weights, client_states) -> (server, client_states):
    trainables/client_states are stacked over the round's clients, weights sum to 1.
  - eval_trees(server) -> (base, lora, head): the global model to evaluate.
  - personal_trees(server, client_state) -> (base, lora, head): a client's own model, for
    algorithms that personalise (evaluated per client as well), or None.
  - regularizer(trainable, client_input) -> scalar added to the local loss, or None.
  - grad_correction(grads, client_input) -> grads, or None.
  """
  name: str
  lora_init: str
  freeze_a: Optional[bool]
  aggregate: Callable
  init: Callable = lambda server: server
  init_client: Callable = lambda server: None
  client_start: Callable = lambda server, client_state: {"lora": server.lora, "head": server.head}
  client_payload: Callable = lambda server, client_state: client_state
  eval_trees: Callable = lambda server: (server.base, server.lora, server.head)
  personal_trees: Optional[Callable] = None
  regularizer: Optional[Callable] = None
  grad_correction: Optional[Callable] = None
  # Which parts of the trainable tree a client sends up ('lora', 'lora_b', 'lora_a', 'head'), for accounting.
  uploads: tuple = ("lora", "head")
  downloads: tuple = ("lora", "head")


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
