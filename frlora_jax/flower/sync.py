"""What travels each round, and how a node keeps its replica of the global model.

Two modes, chosen by the algorithm:
- direct (every rule that leaves the base alone: FedAvg, FedOpt, SCAFFOLD, FlexLoRA, HetLoRA, ...):
  the server computes each client's starting tree and context exactly as in simulation (it keeps
  the client states) and sends them; the node trains on top of its own pre-trained base.
- replay (rules that update the base: FRLoRA, FLoRA, FedEx-LoRA): each node keeps a replica of
  the global `ServerState` (the base's LoRA-targeted kernels, the LoRA, head and algorithm state)
  and brings it up to date by running the algorithm's own `aggregate` on the round's broadcast:
  the weighted mean of the uploads for mean-based rules, the stacked uploads otherwise. A client
  then starts from `client_start(replica)`. FRLoRA's residual base never travels: its nodes
  receive the averaged factors and head (what its `downloads` says) and fold
  s (A_avg B_avg - A0 B0) into their own copy.
A node that missed rounds receives every broadcast since its last one; after a server restart
(resume) a node receives the global state itself once (a snapshot). A checksum of the global
state travels with every message, so a replica that drifted is named instead of trained on.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from frlora_jax import checkpoint, experiment, privacy
from frlora_jax.algorithms import Algorithm, ServerState
from frlora_jax.algorithms.base import weighted_mean


def replays(algorithm: Algorithm, server: ServerState) -> bool:
  """Whether nodes keep a replica (the rule changes the base, which is too big to send each round)."""
  if algorithm.updates_base and algorithm.init_client_state(server) is not None:
    raise NotImplementedError(f"{algorithm.name} updates the base and keeps client states: nodes could not "
                              f"replay its server step; the Flower app does not run it.")
  return algorithm.updates_base


def lean(server: ServerState, algorithm: Algorithm) -> ServerState:
  """The replica form of `server`: of the base, only what the rule changes (nothing if it never does)."""
  return server.replace(base=checkpoint.targeted_kernels(server) if algorithm.updates_base else {})


def with_base(replica: ServerState, base) -> ServerState:
  """The full server state of a replica on top of the node's own (initial) base."""
  return replica.replace(base=checkpoint.with_saved_kernels(base, replica.base) if replica.base else base)


@functools.partial(jax.jit, static_argnames=("algorithm", "dp"))
def broadcast(state, trainables, weights, client_states, *, algorithm: Algorithm,
              dp: Optional[privacy.ClientLevel]):
  """The round's broadcast: (trainables, weights) whose `aggregate` gives every node the new global state."""
  trainables = experiment.aggregated_trainables(state, trainables, client_states, algorithm=algorithm, dp=dp)
  if algorithm.mean_based:
    mean = weighted_mean(trainables, weights)
    return jax.tree_util.tree_map(lambda x: x[None], mean), jnp.ones((1,), jnp.float32)
  return trainables, weights


@functools.partial(jax.jit, static_argnames=("algorithm",))
def replay(replica: ServerState, base, trainables, weights, *, algorithm: Algorithm) -> ServerState:
  """The replica after one round's server step, from that round's broadcast."""
  server, _ = algorithm.aggregate(with_base(replica, base), trainables, weights, None)
  return lean(server, algorithm)


def checksum(replica: ServerState) -> float:
  """Sum of every value of the replica's state (float64): equal on server and node, up to rounding."""
  return float(sum(np.asarray(x, np.float64).sum() for x in jax.tree_util.tree_leaves(replica)))


def check_checksum(node: float, server: float, round_index: int) -> None:
  if abs(node - server) > 1e-4 * (1.0 + abs(server)):
    raise RuntimeError(f"This node's replica of the global model after round {round_index} has checksum {node!r}, "
                       f"the server's {server!r}: the node's state directory belongs to another run or was "
                       f"edited. Delete it (node-config state-dir) and the node resynchronises from the server.")


def broadcast_clients(config, num_clients: int, round_index: int, algorithm: Algorithm) -> int:
  """How many clients a round's broadcast stacks (1 for mean-based rules)."""
  return 1 if algorithm.mean_based else len(experiment.sample_clients(config, num_clients, round_index))


# ----- the node's replica on disk -----

def save_replica(path: str, replica: ServerState, version: int, digest: str) -> None:
  """Write atomically: a node killed mid-write keeps its previous replica."""
  blob = flax.serialization.msgpack_serialize({"version": version, "digest": digest,
                                               "state": flax.serialization.to_state_dict(jax.device_get(replica))})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(blob)
  os.replace(path + ".tmp", path)


def load_replica(path: str, template: ServerState, digest: str) -> tuple[ServerState, int]:
  """(replica, rounds applied) from disk, or (template, 0) when none was saved for this run."""
  if not os.path.exists(path):
    return template, 0
  with open(path, "rb") as f:
    saved = flax.serialization.msgpack_restore(f.read())
  if saved["digest"] != digest:
    return template, 0
  return flax.serialization.from_state_dict(template, saved["state"]), int(saved["version"])
