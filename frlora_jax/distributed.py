"""Runs over several processes (hosts) with `jax.distributed`: the round's clients are spread over
the global `clients` mesh, everything else is replicated.

Every process runs the same program on the same replicated server state. Per round:
- the client ids are padded (client 0 repeated) to a multiple of the global device count, and
  each process owns a contiguous block of them: the block its own devices hold in the mesh;
- each process gathers only its block's batches on the host and feeds them as its part of the
  global input (`jax.make_array_from_process_local_data`); the other client inputs (starting
  trees, keys) are computed replicated and resharded over the mesh;
- the clients' outputs are brought back replicated (an all-gather: the uploads) before the
  server step, so the aggregate, evaluation and host reads are the same on every process.
Only process 0 writes logs, TensorBoard and plots; every process takes part in Orbax saves and
restores. A process that dies stops the others through the coordination service's heartbeat
(`timeout_s`), with jax's error, instead of leaving them waiting in a collective.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 100) -> bool:
  """Join a multi-process run if asked to; True if this is one.

  Asked by the flags, or by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or by a
  SLURM allocation of more than one task (jax detects its address and ids). Checked before
  anything connects, so a wrong flag is named instead of timing out.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
  if process_id < 0 and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
  if not coordinator_address and num_processes <= 1 and process_id < 0:
    if slurm:
      jax.distributed.initialize(initialization_timeout=timeout_s * 3, heartbeat_timeout_seconds=timeout_s)
      return True
    return False
  check(coordinator_address, num_processes, process_id)
  # jax aborts the process (no Python error) when not every process joins in time: say beforehand what to check.
  print(f"Joining a run of {num_processes} processes at {coordinator_address} as process {process_id}; if they "
        f"do not all join within {timeout_s * 3} s (3 x --distributed_timeout) the run stops: every process needs "
        f"the same --coordinator_address and --num_processes and its own --process_id.", file=sys.stderr, flush=True)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout_s * 3, heartbeat_timeout_seconds=timeout_s)
  if jax.process_count() != num_processes:  # the coordinator's count wins; say so instead of running lopsided
    raise ValueError(f"--num_processes={num_processes}, but the coordinator at {coordinator_address} runs "
                     f"{jax.process_count()} processes: give every process the same --num_processes.")
  return True


def define_flags():
  """--coordinator_address, --num_processes, --process_id, --distributed_timeout (train.py, compare);
  returns a function that joins the run they describe (see `initialize`)."""
  from absl import flags
  address = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 for a multi-process run "
                                "(or JAX_COORDINATOR_ADDRESS; SLURM allocations are detected).")
  count = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run (or JAX_NUM_PROCESSES).")
  index = flags.DEFINE_integer("process_id", -1, "This process's id, 0 .. num_processes-1 (or JAX_PROCESS_ID).")
  timeout = flags.DEFINE_integer("distributed_timeout", 100, "Seconds without a heartbeat after which a lost "
                                 "process stops the run (and the wait for all processes to join, x3).")
  return lambda: initialize(address.value, count.value, index.value, timeout.value)


def check(coordinator_address: str, num_processes: int, process_id: int) -> None:
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT of process 0's machine, "
                     f"e.g. 10.0.0.1:12345 (or 127.0.0.1:12345 on one machine).")
  if num_processes < 2:
    raise ValueError(f"--num_processes={num_processes}: a multi-process run needs >= 2 processes; drop "
                     f"--coordinator_address for a single-process run.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) (--num_processes="
                     f"{num_processes}); give each process its own id, 0 on the coordinator's machine.")


def active() -> bool:
  return jax.process_count() > 1


def is_main() -> bool:
  """Process 0 writes the logs (always True in a single-process run)."""
  return jax.process_index() == 0


def mesh() -> Mesh:
  """The global `clients` mesh, devices grouped by process (so each process owns a contiguous block)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), ("clients",))


def replicated_sharding() -> NamedSharding:
  return NamedSharding(mesh(), P())


def replicate(tree):
  """The same host/local values on every process -> global arrays replicated over the mesh."""
  sharding = replicated_sharding()
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def padded_ids(ids: np.ndarray) -> np.ndarray:
  """ids with ids[0] repeated up to a multiple of the global device count (padding is dropped later)."""
  pad = (-len(ids)) % jax.device_count()
  return np.concatenate([ids, np.repeat(ids[:1], pad)]) if pad else ids


def local_block(padded: np.ndarray) -> np.ndarray:
  """This process's contiguous block of the padded clients."""
  per_process = len(padded) // jax.process_count()
  start = jax.process_index() * per_process
  return padded[start:start + per_process]


def over_clients(tree):
  """Replicated client inputs [K_padded, ...] resharded over the mesh along the clients axis."""
  sharding = NamedSharding(mesh(), P("clients"))
  return jax.jit(lambda t: t, out_shardings=sharding)(tree)


def feed_local(local_tree, num_clients: int):
  """This process's block of host arrays [K_local, ...] -> global arrays [num_clients, ...] over the mesh."""
  sharding = NamedSharding(mesh(), P("clients"))
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (num_clients,) + x.shape[1:]),
      local_tree)


def first_clients(tree, k: int):
  """The real clients [:k] of sharded outputs, replicated on every process (the round's uploads)."""
  return jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x[:k], t), out_shardings=replicated_sharding())(tree)


def stop_if_lost_process(error: Exception) -> None:
  """In a multi-process run, a failed collective means another process died: say so and stop now (jax's
  shutdown would otherwise wait out the heartbeat timeout and then abort). Checkpoints are atomic, so the
  last complete one is kept. Any other error returns, to be raised as usual."""
  if not active() or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  print(f"error: process {jax.process_index()} of {jax.process_count()}: a collective with the other processes "
        f"failed ({first_line}). Another process most likely died or was stopped; this one stops too. Rerun the "
        f"same command on every process to resume from the last checkpoint.", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)
