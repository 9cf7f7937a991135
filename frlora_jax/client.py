"""One client's local update as a pure function, and executors that run it for many.

`local_update(shared, client) -> ClientOutput` runs `local_steps` AdamW steps
on the client's trainable tree {"lora", "head"}. `shared` (frozen base params,
the training set on device) is the same for every client; `client` holds what
differs (its example indices, RNG key, starting point, optimizer state).
Executors map it over a stack of clients without knowing the algorithm;
the frozen base is broadcast, never copied per client.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frlora_jax import dropout as dropout_lib
from frlora_jax import lora as lora_lib
from frlora_jax import optim

EXECUTORS = ("auto", "vmap", "map", "loop")


@flax.struct.dataclass
class ClientInput:
  """Per-client inputs; stacked along a leading clients axis for executors."""
  start: Any            # trainable tree {"lora", "head"} the client starts from
  indices: jax.Array    # [max_examples] int32, this client's rows of the train set
  count: jax.Array      # () int32, how many of `indices` are real
  rng: jax.Array        # this client's key for this round
  step0: jax.Array      # () int32, schedule position of the round's first step
  total_steps: jax.Array  # () int32, schedule length
  opt_state: Any = None   # kept optimizer state, or None for a fresh AdamW
  extra: Any = None       # algorithm-specific client state (e.g. control variates)


@flax.struct.dataclass
class ClientOutput:
  trainable: Any
  opt_state: Any
  loss: jax.Array       # mean training loss over the local steps
  finite: jax.Array     # () bool, every loss and the final trainable tree are finite


def softmax_cross_entropy(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()


def make_local_update(apply_fn: Callable, *, tx: optax.GradientTransformation, rates, local_steps: int,
                      batch_size: int, lora_scale: float, lora_dropout: float, warmup_ratio: float,
                      task_loss: Callable = softmax_cross_entropy, dropout_bits: int = 32,
                      regularizer: Optional[Callable] = None,
                      grad_correction: Optional[Callable] = None,
                      on_client_done: Optional[Callable[[], None]] = None) -> Callable:
  """Build `local_update(shared, client)`.

  regularizer(trainable, client) -> scalar is added to the loss (FedProx);
  grad_correction(grads, client) -> grads adjusts gradients (SCAFFOLD);
  on_client_done() is called on the host as each client finishes (progress bars);
  dropout_bits picks the dropout masks' random bits per element (see dropout.py).
  """

  def loss_fn(trainable, base, batch, rng, client):
    k_model, k_lora = jax.random.split(rng)
    params = lora_lib.join_trees(base, trainable["head"])
    with lora_lib.interceptor(trainable["lora"], lora_scale, lora_dropout, k_lora, dropout_bits), \
        dropout_lib.interceptor(dropout_bits):
      logits = apply_fn(params, batch, k_model, deterministic=False)
    loss = task_loss(logits, batch)
    if regularizer is not None:
      loss = loss + regularizer(trainable, client)
    return loss

  grad_fn = jax.value_and_grad(loss_fn)

  def local_update(shared, client: ClientInput) -> ClientOutput:
    base, data = shared["base"], shared["data"]
    opt_state = tx.init(client.start) if client.opt_state is None else client.opt_state

    def step(carry, i):
      trainable, opt_state = carry
      k_batch, k_step = jax.random.split(jax.random.fold_in(client.rng, i))
      rows = client.indices[jax.random.randint(k_batch, (batch_size,), 0, client.count)]
      batch = jax.tree_util.tree_map(lambda column: column[rows], data)
      loss, grads = grad_fn(trainable, base, batch, k_step, client)
      if grad_correction is not None:
        grads = grad_correction(grads, client)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      multiplier = optim.warmup_cosine(client.step0 + i, client.total_steps, warmup_ratio)
      return (optim.apply_step(trainable, updates, rates, multiplier), opt_state), loss

    (trainable, opt_state), losses = jax.lax.scan(step, (client.start, opt_state), jnp.arange(local_steps))
    finite = jnp.all(jnp.isfinite(losses)) & all_finite(trainable)
    if on_client_done is not None:
      jax.debug.callback(on_client_done)
    return ClientOutput(trainable, opt_state if client.opt_state is not None else None, losses.mean(), finite)

  return local_update


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def num_clients(clients) -> int:
  return jax.tree_util.tree_leaves(clients)[0].shape[0]


def take(tree, i):
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _vmapped(fn):
  return jax.vmap(fn, in_axes=(None, 0))


def _pad_clients(clients, multiple: int):
  """Repeat client 0 so the clients axis is a multiple of `multiple` (outputs are sliced off)."""
  k = num_clients(clients)
  pad = (-k) % multiple
  if not pad:
    return clients
  return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]), clients)


def shard_over_devices(body: Callable, devices=None) -> Callable:
  """Split the clients axis over devices (a 1-D mesh named 'clients'); `shared` is replicated.

  Each device runs `body` (the vmap or lax.map of the local update) on its own clients,
  so results equal a single device's and the base weights sit once on every device.
  """
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("clients",))
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("clients")), out_specs=P("clients"), check_vma=False)

  def run(shared, clients):
    k = num_clients(clients)
    out = sharded(shared, _pad_clients(clients, mesh.size))
    return jax.tree_util.tree_map(lambda x: x[:k], out)

  return run


def vmap_body(fn: Callable, clients_per_chunk: int = 0) -> Callable:
  """All clients at once with vmap; at most `clients_per_chunk` at a time if set."""

  def run(shared, clients):
    k = num_clients(clients)
    if not clients_per_chunk or clients_per_chunk >= k:
      return _vmapped(fn)(shared, clients)
    chunked = jax.tree_util.tree_map(lambda x: x.reshape((-1, clients_per_chunk) + x.shape[1:]),
                                     _pad_clients(clients, clients_per_chunk))
    out = jax.lax.map(lambda c: _vmapped(fn)(shared, c), chunked)
    return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:])[:k], out)

  return run


def map_body(fn: Callable) -> Callable:
  """One client after another inside a single compiled lax.map."""
  return lambda shared, clients: jax.lax.map(lambda c: fn(shared, c), clients)


def loop_executor(fn: Callable) -> Callable:
  """A Python loop over a jitted single-client update (easy to debug and profile)."""
  one = jax.jit(fn)

  def run(shared, clients):
    return stack([one(shared, take(clients, i)) for i in range(num_clients(clients))])

  return run


def resolve_executor(name: str, backend: str | None = None) -> str:
  """`auto`: vmap on accelerators; lax.map on CPU, where batching clients does not pay."""
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  return "map" if backend == "cpu" else "vmap"


def make_executor(name: str, fn: Callable, clients_per_chunk: int = 0, shard: bool | None = None) -> Callable:
  """A jitted `run(shared, stacked_clients) -> stacked outputs`.

  shard: split clients over all local devices (default: when there is more than one).
  """
  name = resolve_executor(name)
  if name == "loop":
    return loop_executor(fn)
  if name == "vmap":
    body = vmap_body(fn, clients_per_chunk)
  elif name == "map":
    body = map_body(fn)
  else:
    raise ValueError(f"config.fl.executor={name!r} is unknown; use one of {EXECUTORS}.")
  if shard if shard is not None else jax.device_count() > 1:
    body = shard_over_devices(body)
  # Starts and kept optimizer states are built fresh each round by begin_round and have
  # the outputs' shapes: donating them lets XLA write the outputs into their buffers.
  def split_call(shared, carried, rest):
    return body(shared, rest.replace(start=carried[0], opt_state=carried[1]))

  jitted = jax.jit(split_call, donate_argnums=(1,))
  return lambda shared, clients: jitted(shared, (clients.start, clients.opt_state),
                                        clients.replace(start=None, opt_state=None))
