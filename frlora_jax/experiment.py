"""The round loop: sample clients -> local updates -> aggregate -> evaluate -> log -> checkpoint.

Randomness comes from two streams of the seed (`rng.random_streams`): one for initialisation
(LoRA init, algorithms' own keys) and one for rounds (round r's key, folded with each
client id). The state between rounds is one pytree (`RunState`), so a run resumed from a
checkpoint continues bit for bit as if it had never stopped.

Reading order: `build` (once), then `run` -> `run_round` -> `local_updates` (sample,
`start_round`, the executor's `local_update`) and `server_update` (`finish_round`, which
calls the algorithm's `aggregate`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from frlora_jax import (algorithms, checkpoint, client, config_checks, data as data_lib, distributed, host_memory,
                        interrupts, lora as lora_lib, models, optim, privacy, ranks as ranks_lib, remat, rng,
                        round_data, run_log, scan_layers, weights, workloads)
from frlora_jax.algorithms import Algorithm, ServerState


@flax.struct.dataclass
class RunState:
  """Everything that changes between rounds."""
  round: jax.Array            # () int32, rounds completed
  server: ServerState
  client_steps: jax.Array     # [K] int32, local steps each client has taken
  client_opt: Any = None      # [K, ...] kept optimizer states, or None
  client_states: Any = None   # [K, ...] the algorithm's per-client states, or None
  client_ranks: Any = None    # [K] int32 LoRA rank of each client (config.fl.client_ranks, ranks.py), or None


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """The static settings of a round's client inputs (hashable: a jit static argument)."""
  seed: int
  local_steps: int
  batch_size: int
  keep_optimizer_state: bool
  schedule_over_loader: bool  # published code: schedule length ceil(n_k / batch) * rounds

  @classmethod
  def from_config(cls, config) -> "RoundPlan":
    return cls(config.seed, config.fl.local_steps, config.optim.batch_size, bool(config.fl.keep_optimizer_state),
               config.fl.schedule_steps == "loader")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What the round loop needs besides its state."""
  config: Any
  data: data_lib.FederatedData    # host-side data: partition, eval batches
  model: models.Model             # module, config, tokenizer; its params are dropped once the base is built
  algorithm: Algorithm
  initial_server: ServerState     # after LoRA init and algorithm.init
  base_fingerprint: str           # of the pre-trained base, saved with checkpoints (checkpoint.fingerprint)
  train_batches: round_data.RoundBatches  # the train set on the host; each round's client batches to the device
  train_clients: Callable         # the executor: (shared, stacked ClientInput) -> stacked ClientOutput
  evaluate_model: Callable        # (base, lora, head) -> metrics of that global model
  predict: Optional[Callable]     # classification: jitted (base, lora, head, batch) -> (predictions, losses)
  client_bar: run_log.ClientBar   # per-client progress in long rounds (inert off a terminal)
  # Clients run elsewhere (Flower nodes, flower/server_app.py): (state, inputs, ids, round_index) -> stacked
  # ClientOutput in place of `train_clients`; the inputs come without batches (the clients hold the data).
  remote_clients: Optional[Callable] = None

  @property
  def num_clients(self) -> int:
    return len(self.data.client_indices)

  @property
  def client_counts(self) -> np.ndarray:
    return np.asarray([len(rows) for rows in self.data.client_indices])

  def init_state(self) -> RunState:
    return initial_state(self)


class NonFiniteError(FloatingPointError):
  """A client's loss or update, or the aggregate, is NaN/inf."""


# ----- building an experiment -----

def client_optimizer(config):
  return optim.adamw_direction(config.optim.b1, config.optim.b2, config.optim.eps, config.optim.weight_decay)


def make_local_update(config, algorithm: Algorithm, model: models.Model, local_steps: int,
                      on_client_done: Optional[Callable[[], None]] = lambda: None) -> Callable:
  """One client's `local_update(shared, client_input)` under this config and algorithm."""
  _, freeze_a = algorithms.lora_settings(algorithm, config.lora)
  return client.make_local_update(
      model_loss(config, model), tx=client_optimizer(config),
      lora_lr=config.optim.lr, head_lr=config.optim.head_lr or config.optim.lr,
      freeze_a=freeze_a, local_steps=local_steps, batch_size=config.optim.batch_size,
      schedule=optim.make_schedule(config.optim.schedule, warmup_ratio=config.optim.warmup_ratio,
                                   lr=config.optim.lr, min_lr=config.optim.min_lr),
      loss_units=workloads.for_config(config).loss_units, grad_accum=config.optim.grad_accum,
      regularizer=algorithm.regularizer, grad_correction=algorithm.grad_correction, on_client_done=on_client_done,
      dp_sample=(float(config.dp.clip_norm), float(config.dp.noise_multiplier)) if config.dp.mode == "sample" else None)


def model_loss(config, model: models.Model) -> Callable:
  """`loss(trainable, base, batch, rng)` of one micro-batch as a local step differentiates it (remat, lean LM
  loss, dropout on): what each local step and the memory planner's activation count use."""
  train_apply, task_loss = workloads.for_config(config).make_training(model, config)
  return client.make_model_loss(remat.with_remat(train_apply, model.family, config.model.remat), task_loss=task_loss,
                                lora_scale=lora_lib.scale(config.lora), lora_dropout=config.lora.dropout,
                                dropout_bits=config.model.dropout_bits)


def initial_server(config, base, head, algorithm: Algorithm) -> ServerState:
  """The global model before round 1 from the pre-trained (base, head) (`models.base_and_head`): LoRA
  initialised as the algorithm defines, then its server state."""
  targets = lora_lib.find_targets(base, config.lora.targets)
  if not targets:
    example = lora_lib.path_str(next(iter(lora_lib.find_targets(base, ["."]))))
    raise ValueError(f"config.lora.targets={tuple(config.lora.targets)} match no 2-D kernel of "
                     f"{config.model.name!r}; module paths look like {example}.")
  lora_lib.check_rank(targets, config.lora.rank)
  if algorithm.updates_base:  # exact residual accumulation: float32 targets, whatever the storage dtype
    base = lora_lib.with_kernel_dtype(base, targets, jnp.float32)
  init, _ = algorithms.lora_settings(algorithm, config.lora)
  init_key, _ = rng.random_streams(config.seed)
  lora_key, algorithm_key = jax.random.split(init_key)
  if init == "pissa":
    lora0, base = lora_lib.init_pissa(base, targets, config.lora.rank, lora_lib.scale(config.lora))
  else:
    lora0 = lora_lib.init_kaiming(lora_key, targets, config.lora.rank)
  return algorithm.init(ServerState(base=base, lora=lora0, head=head), algorithm_key)


def build(config, model: Optional[models.Model] = None, data: Optional[data_lib.FederatedData] = None,
          progress: Optional[bool] = None) -> Experiment:
  """Check the config, load data and model (unless given), initialise; compile nothing yet.

  progress: whether the compiled update calls back per client for the progress bar (see
  client.make_local_update); None: config.client_progress.
  """
  config_checks.check(config)
  return _assemble(config, model, data, progress)


def clients_per_chunk(config, model: Optional[models.Model]) -> int:
  """config.fl.clients_per_chunk, with `auto` resolved from the model's shapes (frlora_jax.plan) before any
  data or weights are loaded; a config whose one client does not fit stops here. Only the vmap executor
  (the accelerator default) batches clients: under map and loop, `auto` is one at a time, with no estimate."""
  if config.fl.clients_per_chunk != "auto":
    return config.fl.clients_per_chunk
  if client.resolve_executor(config.fl.executor) != "vmap":
    return 0
  from frlora_jax import plan
  hf_config = model.hf_config if model is not None else plan.model_config(config, None)
  return plan.auto_clients_per_chunk(config, hf_config)


def with_scan_setting(model: models.Model, config) -> models.Model:
  """The model as `config.model.scan_layers` asks to run it (refused for a family that cannot scan)."""
  scan_layers.check(model.family, config.model.scan_layers)
  return dataclasses.replace(model, scan_layers=bool(config.model.scan_layers))


def _assemble(config, model, data, progress: Optional[bool] = None) -> Experiment:
  progress = config.client_progress if progress is None else progress
  workload = workloads.for_config(config)
  chunk = clients_per_chunk(config, model)
  if data is None:
    tokenizer = model.tokenizer if model is not None and model.tokenizer is not None else models.load_tokenizer(
        config.model.name)
    data = data_lib.build(config, tokenizer)
  if model is None:
    model = workload.load_model(config, data)
  model = with_scan_setting(model, config)
  config = privacy.with_resolved_noise(config, [len(rows) for rows in data.client_indices])
  algorithm = algorithms.from_config(config)
  apply_fn = workload.make_apply(model)
  client_bar = run_log.ClientBar()
  local_update = make_local_update(config, algorithm, model, config.fl.local_steps,
                                   on_client_done=client_bar.tick if progress else None)
  shard = None if config.fl.shard_clients == "auto" else config.fl.shard_clients == "on"
  if distributed.active():  # clients are spread over every process's devices
    shard = True
  evaluate_model, predict = workload.make_evaluator(config, model, data, apply_fn, lora_lib.scale(config.lora))
  base, head = models.base_and_head(model, weights.dtype_of(config.model.param_dtype))
  fingerprint, server = checkpoint.fingerprint(base), initial_server(config, base, head, algorithm)
  del base, head  # from here only the initial server (FRLoRA: residual base) holds the weights
  host_memory.release(host_memory.tree_bytes(server.base))  # the loader's freed heap, before compilation stacks on it
  return Experiment(
      config=config, data=data, model=dataclasses.replace(model, params=None), algorithm=algorithm,
      initial_server=server, base_fingerprint=fingerprint,
      train_batches=round_data.RoundBatches(data.train, data.client_indices, seed=config.seed,
                                            steps=config.fl.local_steps,
                                            rows_per_step=config.optim.grad_accum * config.optim.batch_size,
                                            on_device=not distributed.active(),
                                            distinct=config.dp.mode == "sample"),
      train_clients=client.make_executor(config.fl.executor, local_update, chunk, shard=shard),
      evaluate_model=evaluate_model, predict=predict, client_bar=client_bar)


def initial_state(exp: Experiment) -> RunState:
  """Round 0: the initial server, every client's fresh state, no steps taken."""
  return fresh_state(exp.config, exp.algorithm, exp.initial_server, exp.num_clients)


def fresh_state(config, algorithm: Algorithm, server: ServerState, num_clients: int) -> RunState:
  """Round 0 of `num_clients` clients around `server` (pure: the memory planner traces it abstractly)."""
  k = num_clients
  stacked = lambda tree: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), tree)
  client_state = algorithm.init_client_state(server)
  client_opt = None
  if config.fl.keep_optimizer_state:  # the published code's AdamW, kept per client across rounds
    _, freeze_a = algorithms.lora_settings(algorithm, config.lora)
    start = algorithm.client_start(server, client_state)
    client_opt = stacked(client.trained_optimizer_state(client_optimizer(config), start, freeze_a))
  return RunState(round=jnp.zeros((), jnp.int32), server=server, client_steps=jnp.zeros((k,), jnp.int32),
                  client_opt=client_opt, client_states=None if client_state is None else stacked(client_state),
                  client_ranks=client_ranks(config, algorithm, k))


def client_ranks(config, algorithm: Algorithm, num_clients: int) -> Optional[jax.Array]:
  """[K] int32 ranks when clients differ (config.fl.client_ranks) or may prune (HetLoRA), else None."""
  ranks_lib.check_algorithm(config.fl.client_ranks, algorithm)
  ranks = ranks_lib.parse(config.fl.client_ranks, num_clients, config.lora.rank)
  if ranks is None and algorithm.update_ranks is not None:
    ranks = np.full((num_clients,), config.lora.rank, np.int32)
  return None if ranks is None else jnp.asarray(ranks, jnp.int32)


# ----- one round -----

def sample_clients(config, num_clients: int, round_index: int) -> np.ndarray:
  """The round's clients: all, or `clients_per_round` drawn without replacement (seeded by round)."""
  m = config.fl.clients_per_round or num_clients
  if m >= num_clients:
    return np.arange(num_clients)
  rng = np.random.default_rng([config.seed, round_index, 0x5EED])
  return np.sort(rng.choice(num_clients, size=m, replace=False))


def participations(config, num_clients: int, rounds: int) -> np.ndarray:
  """[K] how many of the first `rounds` rounds each client trained in (the privacy accountant's steps)."""
  counts = np.zeros(num_clients, np.int64)
  for r in range(rounds):
    counts[sample_clients(config, num_clients, r)] += 1
  return counts


def client_weights(weighting: str, counts: np.ndarray) -> np.ndarray:
  """p_k: data-size weights or uniform, summing to 1."""
  counts = np.asarray(counts, np.float64)
  w = counts / counts.sum() if weighting == "data_size" else np.full(len(counts), 1.0 / len(counts))
  return w.astype(np.float32)


def for_each_client(fn: Callable, server: ServerState, client_states, num: int):
  """fn(server, client_state) stacked over `num` clients: stateless clients (None) all get the same tree."""
  if client_states is None:
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num,) + x.shape), fn(server, None))
  return jax.vmap(fn, in_axes=(None, 0))(server, client_states)


@functools.partial(jax.jit, static_argnames=("algorithm", "plan"))
def start_round(state: RunState, ids, round_index, total_rounds, counts, *, algorithm: Algorithm, plan: RoundPlan):
  """The round's `ClientInput`s (start, key, schedule position) and the clients' states going in."""
  client_states = _take(state.client_states, ids)
  starts = for_each_client(algorithm.client_start, state.server, client_states, len(ids))
  context = for_each_client(algorithm.client_context, state.server, client_states, len(ids))
  # Fresh AdamW each round (paper): the schedule spans rounds*local_steps and round r starts at
  # r*local_steps. Kept AdamW (published code): each client's own step count, and a schedule of
  # ceil(n_k / batch) * rounds steps.
  step0 = state.client_steps[ids] if plan.keep_optimizer_state else jnp.full(ids.shape, round_index * plan.local_steps)
  if plan.schedule_over_loader:
    total = (-(-counts[ids] // plan.batch_size)) * total_rounds
  else:
    total = jnp.full(ids.shape, total_rounds * plan.local_steps)
  rank_mask = None
  if state.client_ranks is not None:  # clients of different ranks: each trains its first r_k components
    rank_mask = ranks_lib.masks(state.client_ranks[ids], lora_lib.rank_of(state.server.lora))
    if algorithm.rank_heterogeneity == "truncate":
      starts = dict(starts, lora=jax.vmap(ranks_lib.mask_lora)(starts["lora"], rank_mask))
  inputs = client.ClientInput(
      start=starts, rng=rng.round_keys(plan.seed, round_index, ids), step0=step0.astype(jnp.int32),
      total_steps=total.astype(jnp.int32), opt_state=_take(state.client_opt, ids), context=context,
      rank_mask=rank_mask)
  return inputs, client_states


@functools.partial(jax.jit, static_argnames=("algorithm", "local_steps", "dp"))
def finish_round(state: RunState, outputs: client.ClientOutput, ids, weights, client_states, *,
                 algorithm: Algorithm, local_steps: int, dp: Optional[privacy.ClientLevel] = None):
  """Aggregate, and write the clients' kept states back; `finite` guards the commit.

  dp: client-level DP (DP-FedAvg): the server sees clipped, noised updates (privacy.py).
  """
  trainables = aggregated_trainables(state, outputs.trainable, client_states, algorithm=algorithm, dp=dp)
  server, new_client_states = algorithm.aggregate(state.server, trainables, weights, client_states)
  ranks = state.client_ranks
  if ranks is not None and algorithm.update_ranks is not None:
    ranks = ranks.at[ids].set(algorithm.update_ranks(state.server, outputs.trainable, ranks[ids]))
  new_state = RunState(round=state.round + 1, server=server, client_steps=state.client_steps.at[ids].add(local_steps),
                       client_opt=_put(state.client_opt, ids, outputs.opt_state),
                       client_states=_put(state.client_states, ids, new_client_states), client_ranks=ranks)
  return new_state, client.all_finite(server)


def aggregated_trainables(state: RunState, trainables, client_states, *, algorithm: Algorithm,
                          dp: Optional[privacy.ClientLevel]):
  """What the server step aggregates: the clients' trees, clipped and noised under client-level DP."""
  if dp is None:
    return trainables
  starts = for_each_client(algorithm.client_start, state.server, client_states, jax.tree_util.tree_leaves(
      trainables)[0].shape[0])
  return privacy.privatize_updates(starts, trainables, rng.privacy_key(dp.seed, state.round), dp)


# The same step writing the new state into the old one's buffers: FRLoRA's base += s B A then
# needs no second copy of the base. The old state is gone afterwards, so only `run` uses it.
finish_round_in_place = jax.jit(finish_round.__wrapped__, static_argnames=("algorithm", "local_steps", "dp"),
                                donate_argnames=("state",))


@dataclasses.dataclass
class LocalUpdates:
  """What the round's clients sent back, before aggregation."""
  ids: np.ndarray                # client ids, sorted
  output: client.ClientOutput    # stacked over `ids`
  weights: jax.Array             # aggregation weights p_k, summing to 1
  client_states: Any             # the clients' algorithm states going in


def local_updates(exp: Experiment, state: RunState, round_index: int) -> LocalUpdates:
  """Client phase of a round: sample, start every client from the server, train locally."""
  config = exp.config
  ids = sample_clients(config, exp.num_clients, round_index)
  started = distributed.padded_ids(ids) if distributed.active() else ids
  inputs, client_states = start_round(state, jnp.asarray(started, jnp.int32), jnp.int32(round_index),
                                      jnp.int32(config.fl.rounds), exp.train_batches.counts, algorithm=exp.algorithm,
                                      plan=RoundPlan.from_config(config))
  upcoming = round_index + 1
  next_round = (upcoming, sample_clients(config, exp.num_clients, upcoming)) if upcoming < config.fl.rounds else None
  if exp.remote_clients is not None:
    out = exp.remote_clients(state, inputs, ids, round_index)
  elif distributed.active():
    out, client_states = _train_over_processes(exp, state, inputs, client_states, ids, round_index, next_round)
  else:
    inputs = inputs.replace(batches=exp.train_batches.for_round(round_index, ids, next_round))
    out = exp.train_clients({"base": state.server.base}, inputs)
  finite = np.asarray(out.finite)
  if not finite.all():
    raise NonFiniteError(f"Round {round_index + 1}: non-finite loss or update from client(s) "
                         f"{ids[~finite].tolist()}; the run stopped and the last good checkpoint is kept. "
                         f"Lower config.optim.lr or check the data.")
  weights = jnp.asarray(client_weights(config.fl.weighting, exp.client_counts[ids]))
  return LocalUpdates(ids, out, weights, client_states)


def _train_over_processes(exp: Experiment, state: RunState, inputs: client.ClientInput, client_states,
                          ids: np.ndarray, round_index: int, next_round):
  """The client phase of a multi-process run (distributed.py): inputs for the padded clients, each process
  feeding its own block's batches; back come the real clients' outputs and states, replicated."""
  padded = distributed.padded_ids(ids)
  upcoming = None if next_round is None else (next_round[0],
                                              distributed.local_block(distributed.padded_ids(next_round[1])))
  batches = exp.train_batches.for_round(round_index, distributed.local_block(padded), upcoming)
  inputs = distributed.over_clients(inputs).replace(batches=distributed.feed_local(batches, len(padded)))
  out = exp.train_clients({"base": state.server.base}, inputs)
  return distributed.first_clients((out, client_states), len(ids))


def server_update(exp: Experiment, state: RunState, updates: LocalUpdates, in_place: bool = False) -> RunState:
  """Server phase of a round: the algorithm's aggregate, committed only if finite.

  in_place: donate `state` (its arrays are deleted; the new state reuses their memory).
  """
  step = finish_round_in_place if in_place else finish_round
  new_state, finite = step(state, updates.output, jnp.asarray(updates.ids, jnp.int32), updates.weights,
                           updates.client_states, algorithm=exp.algorithm, local_steps=exp.config.fl.local_steps,
                           dp=privacy.client_level(exp.config))
  if not bool(finite):
    raise NonFiniteError(f"Round {int(state.round) + 1}: the aggregated global model is non-finite; "
                         f"the run stopped and the last good checkpoint is kept.")
  return new_state


def run_round(exp: Experiment, state: RunState, round_index: int) -> tuple[RunState, dict]:
  """One federated round; returns the new state and its training record."""
  return commit_round(exp, state, local_updates(exp, state, round_index), round_index)


def commit_round(exp: Experiment, state: RunState, updates: LocalUpdates, round_index: int,
                 in_place: bool = False) -> tuple[RunState, dict]:
  """The server phase of a round and its training record."""
  new_state = server_update(exp, state, updates, in_place)
  losses = np.asarray(updates.output.loss, np.float64)
  record = {"round": round_index + 1, "algorithm": exp.algorithm.name,
            "train_loss": float(losses.mean()), "client_losses": [round(float(x), 6) for x in losses],
            "clients": updates.ids.tolist()}
  if new_state.client_ranks is not None:  # after the round (HetLoRA may have pruned)
    record["client_ranks"] = np.asarray(new_state.client_ranks)[updates.ids].tolist()
  return new_state, record


def evaluate(exp: Experiment, server: ServerState) -> dict[str, float]:
  """Metrics of the global (merged) model on the eval split."""
  return exp.evaluate_model(*exp.algorithm.eval_trees(server))


def evaluate_personal(exp: Experiment, state: RunState) -> dict[str, float]:
  """Mean over clients of each client's own model's metrics (personalising algorithms)."""
  per_client = [exp.evaluate_model(*exp.algorithm.personal_trees(state.server, _take(state.client_states, k)))
                for k in range(exp.num_clients)]
  return {name: float(np.mean([m[name] for m in per_client])) for name in per_client[0]}


def _take(tree, ids):
  return None if tree is None else jax.tree_util.tree_map(lambda x: x[ids], tree)


def _put(tree, ids, values):
  return None if tree is None else jax.tree_util.tree_map(lambda x, v: x.at[ids].set(v), tree, values)


def communication_bytes(algorithm: Algorithm, trainable, num_clients: int, ranks=None) -> dict:
  """Bytes each of a round's clients uploads and downloads under the algorithm, and the round's total.

  Parts: 'lora', 'lora_a', 'lora_b', 'head'; 'control' (SCAFFOLD's control variates, the size of
  lora + head); 'lora_stacked' (FLoRA: the factors of every one of the round's clients).
  ranks: the LoRA ranks the round's clients trained at, when they differ (config.fl.client_ranks);
  then the per-client figures are lists in the round's client order. A rank-r_k client moves r_k
  of the r_max components: it uploads only those it trained, and under 'truncate' (FLoRA, FlexLoRA,
  HetLoRA) downloads only those too; under 'freeze' (FRLoRA) it downloads the whole global factors,
  since it starts from them. LoRA bytes scale with the rank, the head's do not.
  """
  nbytes = host_memory.tree_bytes
  lora_b, lora_a = lora_lib.split_factors(trainable["lora"], "a")
  full = {"lora": nbytes(trainable["lora"]), "lora_a": nbytes(lora_a), "lora_b": nbytes(lora_b)}
  max_rank = lora_lib.rank_of(trainable["lora"])
  round_ranks = [max_rank] * num_clients if ranks is None else [int(r) for r in ranks]

  def client_bytes(parts, rank):
    sizes = {name: size * rank // max_rank for name, size in full.items()}
    sizes["head"] = nbytes(trainable["head"])
    sizes["control"] = full["lora"] + sizes["head"]
    sizes["lora_stacked"] = full["lora"] * sum(round_ranks) // max_rank
    return sum(sizes[p] for p in parts)

  whole = algorithm.rank_heterogeneity != "truncate"
  up = [client_bytes(algorithm.uploads, r) for r in round_ranks]
  down = [client_bytes(algorithm.downloads, max_rank if whole else r) for r in round_ranks]
  total = sum(up) + sum(down)
  if ranks is None:
    return {"upload_per_client": up[0], "download_per_client": down[0], "total": total}
  return {"upload_per_client": up, "download_per_client": down, "total": total}


# ----- the run -----

def is_eval_round(config, round_number: int) -> bool:
  return round_number % config.eval_every == 0 or round_number == config.fl.rounds


def run(config, workdir: str, model: Optional[models.Model] = None,
        remote_clients: Optional[Callable] = None) -> list[dict]:
  """Run (or resume) an experiment in `workdir`; returns this invocation's round records.

  remote_clients(exp) -> the experiment's `remote_clients` (clients trained elsewhere: Flower).
  """
  config_checks.check(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir, config)  # refuses an incompatible resume before any work
  exp = _assemble(config, model, None)
  if remote_clients is not None:
    exp = dataclasses.replace(exp, remote_clients=remote_clients(exp))
  template = exp.init_state()
  if distributed.active():  # the server state is replicated over every process's devices
    template = distributed.replicate(template)
  state, history = ckpt.restore_latest(template, exp.base_fingerprint)
  del template
  exp = dataclasses.replace(exp, initial_server=None)  # the run's state owns the base from here on
  start = int(state.round)
  log = run_log.RunLog(workdir, config, history, write=distributed.is_main())
  accountant = privacy.accountant(exp.config, exp.client_counts, exp.config.dp.noise_multiplier)
  records, logged = [], state
  weight_bytes = host_memory.tree_bytes(state.server.base)
  if config.eval_before_training and start == 0 and not history:
    record = {"round": 0, "algorithm": exp.algorithm.name, "eval": evaluate(exp, state.server), "clients": []}
    if host_memory.worth_it(weight_bytes):
      jax.clear_caches()  # nothing of the round is compiled yet: the evaluation's programs leave no code resident
    host_memory.release(weight_bytes)
    history.append(record)
    log.write(record)
    records.append(record)
  try:
    with log.progress(start, config.fl.rounds) as progress:
      last_round_s = 0.0
      for r in range(start, config.fl.rounds):
        t0 = time.time()
        exp.client_bar.start(config.fl.clients_per_round or exp.num_clients, last_round_s)
        updates = local_updates(exp, state, r)  # an interrupt here saves `logged`, untouched so far
        comm = communication_bytes(exp.algorithm, {"lora": state.server.lora, "head": state.server.head},
                                   len(updates.ids), None if state.client_ranks is None
                                   else np.asarray(state.client_ranks)[updates.ids])  # before `state` is donated
        with interrupts.deferred(f"Interrupt received: finishing round {r + 1}'s server step, eval and log, "
                                 f"then saving."):
          state, record = commit_round(exp, state, updates, r, in_place=True)  # `logged`'s buffers now `state`'s
          exp.client_bar.stop()
          if is_eval_round(config, r + 1):
            record["eval"] = evaluate(exp, state.server)
            if exp.algorithm.personal_trees is not None:
              record["eval_personal"] = evaluate_personal(exp, state)
          record["seconds"] = last_round_s = round(time.time() - t0, 4)
          record["communication"] = comm
          if accountant is not None:
            record["privacy"] = accountant.record(r + 1 if accountant.mode == "client" else
                                                  participations(config, exp.num_clients, r + 1))
          history.append(record)
          logged = state
          log.write(record)
          progress.update(record, exp.data.metric)
          records.append(record)
          ckpt.maybe_save(state, r + 1, history, force=(r + 1 == config.fl.rounds))
          if r == start:
            host_memory.release(weight_bytes)  # what compiling the round's programs freed
  except KeyboardInterrupt:
    # Save the last complete round, and make metrics.jsonl say exactly what it holds
    # (the interrupt may have landed between the two writes, or inside one).
    saved_round = int(logged.round)
    ckpt.save_now(logged, saved_round, history)
    log.rewrite([r for r in history if r["round"] <= saved_round])
    print(f"Interrupted: saved round {saved_round} in {workdir}; run the same command to resume.", file=sys.stderr)
    raise SystemExit(130)
  finally:
    ckpt.close()
    log.close()
  log.finish()
  return records
