"""One client's local update as a pure function, and executors that run it for many.

`local_update(shared, client) -> ClientOutput` runs `local_steps` AdamW steps
on the client's trainable tree {"lora", "head"}. `shared` (the frozen base
params) is the same for every client; `client` holds what differs (its batches
for the round, RNG key, starting point, optimizer state).
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
from frlora_jax import optim, privacy
from frlora_jax import ranks as ranks_lib

EXECUTORS = ("auto", "vmap", "map", "loop")


@flax.struct.dataclass
class ClientInput:
  """Per-client inputs; stacked along a leading clients axis for executors."""
  start: Any            # trainable tree {"lora", "head"} the client starts from
  rng: jax.Array        # this client's key for this round (dropout; its batches were drawn from it too)
  step0: jax.Array      # () int32, schedule position of the round's first step
  total_steps: jax.Array  # () int32, schedule length
  opt_state: Any = None   # kept optimizer state (of the trained part), or None for a fresh AdamW
  context: Any = None     # what the algorithm's loss / gradient hooks read (Algorithm.client_context)
  batches: Any = None     # {column: [local_steps, grad_accum * batch_size, ...]} (round_data.RoundBatches)
  rank_mask: Any = None   # [r_max] 0/1: the LoRA components this client trains (ranks.py), or None: all


@flax.struct.dataclass
class ClientOutput:
  trainable: Any
  opt_state: Any
  loss: jax.Array       # mean training loss over the local steps
  finite: jax.Array     # () bool, every loss and the final trainable tree are finite


def softmax_cross_entropy(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()


def split_trainable(trainable, freeze_a: bool):
  """(trained, frozen): what local training differentiates and updates, and what it holds fixed.

  A frozen A gets no gradient and no optimizer state (it is not in `trained`).
  """
  if not freeze_a:
    return trainable, None
  lora_b, lora_a = lora_lib.split_factors(trainable["lora"], "a")
  return {"lora": lora_b, "head": trainable["head"]}, {"lora": lora_a}


def join_trainable(trained, frozen):
  if frozen is None:
    return trained
  return {"lora": lora_lib.join_trees(trained["lora"], frozen["lora"]), "head": trained["head"]}


def trained_optimizer_state(tx: optax.GradientTransformation, trainable, freeze_a: bool):
  """A fresh optimizer state for the trained part of `trainable`."""
  return tx.init(split_trainable(trainable, freeze_a)[0])


def examples_in(batch):
  """Loss units of a classification batch: its examples (the loss is their mean)."""
  return jnp.asarray(jax.tree_util.tree_leaves(batch)[0].shape[0], jnp.float32)


def make_model_loss(apply_fn: Callable, *, task_loss: Callable, lora_scale: float, lora_dropout: float,
                    dropout_bits: int) -> Callable:
  """`model_loss(trainable, base, batch, rng)`: one batch's training loss (dropout on) of base + LoRA + head."""

  def model_loss(trainable, base, batch, rng):
    k_model, k_lora = jax.random.split(rng)
    params = lora_lib.join_trees(base, trainable["head"])
    with lora_lib.interceptor(trainable["lora"], lora_scale, lora_dropout, k_lora, dropout_bits), \
        dropout_lib.interceptor(dropout_bits):
      outputs = apply_fn(params, batch, k_model, deterministic=False)
    return task_loss(outputs, batch)

  return model_loss


def make_local_update(model_loss: Callable, *, tx: optax.GradientTransformation, lora_lr: float, head_lr: float,
                      freeze_a: bool, local_steps: int, batch_size: int, schedule: Callable, grad_accum: int = 1,
                      loss_units: Callable = examples_in, regularizer: Optional[Callable] = None,
                      grad_correction: Optional[Callable] = None, dp_sample: Optional[tuple[float, float]] = None,
                      on_client_done: Optional[Callable[[], None]] = lambda: None) -> Callable:
  """Build `local_update(shared, client)` around `model_loss(trainable, base, batch, rng)` (make_model_loss).

  Each local step takes its grad_accum * batch_size rows (drawn on the host, round_data.py) and,
  with grad_accum > 1, runs them as grad_accum micro-batches of batch_size one after another,
  weighting each micro-batch's loss and gradient by its share of `loss_units` (examples, or
  response tokens for LMs), so the step equals the big batch's up to float rounding and
  dropout masks (drawn per micro-batch) while holding one micro-batch's activations.
  schedule(step, round_start, total_steps) -> the learning-rate multiplier (optim.make_schedule);
  regularizer(trainable, client) -> scalar is added to the loss (FedProx);
  grad_correction(grads, client) -> grads adjusts gradients (SCAFFOLD), on the whole
  trainable tree (a frozen A's entries are zeros there and dropped after);
  dp_sample=(clip_norm, noise_multiplier): DP-SGD (privacy.py): every example's gradient clipped,
  summed, Gaussian noise added, divided by the step's rows (examples weigh equally);
  on_client_done() is called on the host as each client finishes (progress bars). It is
  compiled in whether or not anyone is watching, so the program does not depend on a terminal;
  None leaves it out (Flower nodes: a program with a host callback is never served from JAX's
  persistent compilation cache).
  """

  def batch_loss(trained, frozen, base, batch, rng):
    return model_loss(join_trainable(trained, frozen), base, batch, rng)

  def loss_fn(trained, frozen, base, batch, rng, client):
    loss = batch_loss(trained, frozen, base, batch, rng)
    if regularizer is not None:
      loss = loss + regularizer(join_trainable(trained, frozen), client)
    return loss

  def micro_batches(batch):
    """[grad_accum * batch_size, ...] -> [grad_accum, batch_size, ...]"""
    return jax.tree_util.tree_map(lambda x: x.reshape((grad_accum, batch_size) + x.shape[1:]), batch)

  def with_penalty(loss, grads, trained, frozen, client):
    """The regularizer's value and gradient added (it reads only the parameters: no data)."""
    if regularizer is None:
      return loss, grads
    penalty, penalty_grads = jax.value_and_grad(lambda t: regularizer(join_trainable(t, frozen), client))(trained)
    return loss + penalty, jax.tree_util.tree_map(jnp.add, grads, penalty_grads)

  def accumulated_value_and_grad(trained, frozen, base, batch, rng, client):
    micro = micro_batches(batch)
    units = jax.vmap(loss_units)(micro)
    shares = units / jnp.maximum(units.sum(), 1e-9)

    def add_micro_batch(total, xs):
      micro_batch, key, share = xs
      loss, grads = jax.value_and_grad(batch_loss)(trained, frozen, base, micro_batch, key)
      return (total[0] + share * loss, jax.tree_util.tree_map(lambda t, g: t + share * g, total[1], grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, trained))
    (loss, grads), _ = jax.lax.scan(add_micro_batch, zeros, (micro, jax.random.split(rng, grad_accum), shares))
    return with_penalty(loss, grads, trained, frozen, client)

  def private_value_and_grad(trained, frozen, base, batch, rng, client):
    clip_norm, noise_multiplier = dp_sample
    rows = grad_accum * batch_size
    micro = micro_batches(batch)

    def one_example(example, key):
      loss, grads = jax.value_and_grad(batch_loss)(trained, frozen, base,
                                                   jax.tree_util.tree_map(lambda x: x[None], example), key)
      return loss, privacy.clip(grads, clip_norm)

    def add_micro_batch(total, xs):
      micro_batch, key = xs
      weights = micro_batch.pop("example_weights", jnp.ones((batch_size,), jnp.float32))  # 0: a small client's filler
      losses, grads = jax.vmap(one_example)(micro_batch, jax.random.split(key, batch_size))
      weighted = lambda t, g: t + jnp.tensordot(weights, g.astype(jnp.float32), axes=1)
      return (total[0] + weights @ losses, jax.tree_util.tree_map(weighted, total[1], grads), total[2] + weights.sum()), None

    k_examples, k_noise = jax.random.split(rng)
    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), trained),
             jnp.zeros((), jnp.float32))
    (loss, grads, examples), _ = jax.lax.scan(add_micro_batch, zeros, (dict(micro), jax.random.split(k_examples, grad_accum)))
    noise = privacy.gaussian_like(grads, k_noise, noise_multiplier * clip_norm)
    # divided by the step's rows, a constant (not by the examples present, which depend on the data)
    grads = jax.tree_util.tree_map(lambda g, z, p: ((g + z) / rows).astype(p.dtype), grads, noise, trained)
    return with_penalty(loss / jnp.maximum(examples, 1.0), grads, trained, frozen, client)  # no data in the penalty

  if dp_sample is not None:
    grad_fn = private_value_and_grad
  else:
    grad_fn = jax.value_and_grad(loss_fn) if grad_accum == 1 else accumulated_value_and_grad

  def corrected(grads, frozen, client):
    if grad_correction is None:
      return grads
    zeros = None if frozen is None else jax.tree_util.tree_map(jnp.zeros_like, frozen)
    return split_trainable(grad_correction(join_trainable(grads, zeros), client), frozen is not None)[0]

  def local_update(shared, client: ClientInput) -> ClientOutput:
    base = shared["base"]
    trained, frozen = split_trainable(client.start, freeze_a)
    rates = optim.learning_rates(trained, lora_lr, head_lr)
    opt_state = tx.init(trained) if client.opt_state is None else client.opt_state

    def step(carry, step_input):
      trained, opt_state = carry
      i, batch = step_input
      _, k_step = jax.random.split(jax.random.fold_in(client.rng, i))  # the first half drew the batch's rows
      loss, grads = grad_fn(trained, frozen, base, batch, k_step, client)
      updates, opt_state = tx.update(corrected(grads, frozen, client), opt_state, trained)
      if client.rank_mask is not None:  # components beyond the client's rank stay as they started
        updates = dict(updates, lora=ranks_lib.mask_lora(updates["lora"], client.rank_mask))
      multiplier = schedule(client.step0 + i, client.step0, client.total_steps)
      return (optim.apply_step(trained, updates, rates, multiplier), opt_state), loss

    (trained, opt_state), losses = jax.lax.scan(step, (trained, opt_state), (jnp.arange(local_steps), client.batches))
    trainable = join_trainable(trained, frozen)
    finite = jnp.all(jnp.isfinite(losses)) & all_finite(trainable)
    if on_client_done is not None:  # a per-client argument: one call per client under vmap
      jax.debug.callback(lambda _: on_client_done(), losses[-1])
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
  from frlora_jax import distributed
  mesh = Mesh(np.asarray(devices), ("clients",)) if devices is not None else distributed.mesh()
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("clients")), out_specs=P("clients"), check_vma=False)

  def run(shared, clients):
    k = num_clients(clients)
    if k % mesh.size == 0:  # (a multi-process run pads before it builds its global inputs)
      return sharded(shared, clients)
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
  # Starts and kept optimizer states are built fresh each round by start_round and have
  # the outputs' shapes: donating them lets XLA write the outputs into their buffers.
  def split_call(shared, carried, rest):
    return body(shared, rest.replace(start=carried[0], opt_state=carried[1]))

  jitted = jax.jit(split_call, donate_argnums=(1,))
  return lambda shared, clients: jitted(shared, (clients.start, clients.opt_state),
                                        clients.replace(start=None, opt_state=None))
