"""The round loop: sample clients -> local updates -> aggregate -> evaluate -> log -> checkpoint.

All randomness of round r comes from fold_in(PRNGKey(seed), r), and the state
between rounds is one pytree (`RunState`), so a run resumed from a checkpoint
continues bit for bit as if it had never stopped.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from frlora_jax import (algorithms, checkpoint, client, config_checks, data as data_lib, lora as lora_lib, models,
                        optim, run_log, workloads)
from frlora_jax.algorithms import Algorithm, ServerState


@flax.struct.dataclass
class RunState:
  """Everything that changes between rounds."""
  round: jax.Array          # () int32, rounds completed
  server: ServerState
  client_steps: jax.Array   # [K] int32, local steps each client has taken
  client_opt: Any = None    # [K, ...] kept optimizer states, or None
  client_extra: Any = None  # [K, ...] algorithm client states, or None


@dataclasses.dataclass
class Experiment:
  """What a run needs besides its state: data, model functions, compiled steps."""
  config: Any
  data: data_lib.FederatedData
  model: models.Model
  algorithm: Algorithm
  lora_scale: float
  freeze_a: bool
  train_on_device: dict
  client_matrix: np.ndarray
  client_counts: np.ndarray
  executor: Callable
  begin_round: Callable         # jitted: (state, ids, round, rounds) -> (ClientInput, client states)
  end_round: Callable           # jitted: (state, output, ids, weights, extras) -> (state, finite)
  evaluator: Callable            # (base, lora, head) -> metrics of that global model
  predict: Optional[Callable]    # classification: jitted (base, lora, head, batch) -> (predictions, losses)
  init_state: Callable[[], RunState]
  client_bar: Any                         # run_log.ClientBar on a terminal, else None
  local_update_for: Callable[[int], Callable]  # local_steps -> local_update (for FLOP counts)

  @property
  def num_clients(self) -> int:
    return len(self.client_counts)


def build(config, model: Optional[models.Model] = None,
          data: Optional[data_lib.FederatedData] = None) -> Experiment:
  """Check the config, load data and model (unless given), and compile nothing yet."""
  config_checks.check(config)
  workload = workloads.for_config(config)
  if data is None:
    tokenizer = model.tokenizer if model is not None and model.tokenizer is not None else models.load_tokenizer(config.model.name)
    data = data_lib.build(config, tokenizer)
  if model is None:
    model = workload.load_model(config, data)
  fl, lo, op = config.fl, config.lora, config.optim
  algorithm = algorithms.build(fl.algorithm, lora_scale=lo.alpha / lo.rank, aggregation=fl.aggregation,
                               config=config)
  base, head = lora_lib.split_tree(model.params, model.head_patterns)
  targets = lora_lib.find_targets(base, lo.targets)
  if not targets:
    raise ValueError(f"config.lora.targets={tuple(lo.targets)} match no 2-D kernel of {config.model.name!r}; "
                     f"module paths look like {lora_lib.path_str(next(iter(lora_lib.find_targets(base, ['.']))))}.")
  lora_lib.check_rank(targets, lo.rank)
  scale = lo.alpha / lo.rank
  init = algorithm.lora_init if lo.init == "auto" else lo.init
  freeze_a = algorithm.freeze_a if algorithm.freeze_a is not None else bool(lo.freeze_a)
  apply_fn = workload.make_apply(model)

  key = jax.random.PRNGKey(config.seed)
  if init == "pissa":
    lora0, base = lora_lib.init_pissa(base, targets, lo.rank, scale)
  else:
    lora0 = lora_lib.init_kaiming(jax.random.fold_in(key, 1), targets, lo.rank)
  server0 = algorithm.init(ServerState(base=base, lora=lora0, head=head))

  trainable0 = {"lora": lora0, "head": head}
  tx = optim.adamw_direction(op.b1, op.b2, op.eps, op.weight_decay)
  rates = optim.learning_rates(trainable0, op.lr, op.head_lr or op.lr, freeze_a)
  client_bar = run_log.ClientBar() if sys.stderr.isatty() else None

  def local_update_for(local_steps: int):
    return client.make_local_update(
        apply_fn, tx=tx, rates=rates, local_steps=local_steps, batch_size=op.batch_size,
        lora_scale=scale, lora_dropout=lo.dropout, warmup_ratio=op.warmup_ratio, task_loss=workload.task_loss,
        dropout_bits=config.model.dropout_bits, regularizer=algorithm.regularizer,
        grad_correction=algorithm.grad_correction,
        on_client_done=client_bar.tick if client_bar is not None else None)

  executor = client.make_executor(fl.executor, local_update_for(fl.local_steps), fl.clients_per_chunk,
                                  shard=None if fl.shard_clients == "auto" else fl.shard_clients == "on")
  matrix, counts = data_lib.partition.pack(data.client_indices)
  k = len(counts)

  def init_state() -> RunState:
    stacked = lambda tree: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), tree)
    extra = algorithm.init_client(server0)
    return RunState(
        round=jnp.zeros((), jnp.int32), server=server0, client_steps=jnp.zeros((k,), jnp.int32),
        client_opt=stacked(tx.init(trainable0)) if fl.keep_optimizer_state else None,
        client_extra=None if extra is None else stacked(extra))

  matrix_on_device, counts_on_device = jnp.asarray(matrix), jnp.asarray(counts)

  def begin_round(state: RunState, ids, round_index, total_rounds):
    """The round's ClientInputs: per-client keys (by client id), starts, schedule positions."""
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), round_index)
    extras = _take(state.client_extra, ids)
    if extras is None:
      start = algorithm.client_start(state.server, None)
      starts = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (len(ids),) + x.shape), start)
      payload = None
    else:
      starts = jax.vmap(algorithm.client_start, in_axes=(None, 0))(state.server, extras)
      payload = jax.vmap(algorithm.client_payload, in_axes=(None, 0))(state.server, extras)
    # Fresh AdamW each round (paper): the schedule spans rounds*local_steps and round r starts
    # at r*local_steps. Kept AdamW (published code): each client's own step count. Schedule
    # length `loader` is ceil(n_k / batch) * rounds, as in the published code.
    if fl.keep_optimizer_state:
      step0 = state.client_steps[ids]
    else:
      step0 = jnp.full(ids.shape, round_index * fl.local_steps, jnp.int32)
    if fl.schedule_steps == "loader":
      total = (-(-counts_on_device[ids] // op.batch_size)) * total_rounds
    else:
      total = jnp.full(ids.shape, total_rounds * fl.local_steps, jnp.int32)
    inputs = client.ClientInput(
        start=starts, indices=matrix_on_device[ids], count=counts_on_device[ids],
        rng=jax.vmap(lambda i: jax.random.fold_in(key, i))(ids), step0=step0.astype(jnp.int32),
        total_steps=total.astype(jnp.int32), opt_state=_take(state.client_opt, ids), extra=payload)
    return inputs, extras

  def end_round(state: RunState, out: client.ClientOutput, ids, weights, extras):
    """Aggregate, and write the clients' kept states back; `finite` guards the commit."""
    server, new_extras = algorithm.aggregate(state.server, out.trainable, weights, extras)
    new_state = RunState(round=state.round + 1, server=server,
                         client_steps=state.client_steps.at[ids].add(fl.local_steps),
                         client_opt=_put(state.client_opt, ids, out.opt_state),
                         client_extra=_put(state.client_extra, ids, new_extras))
    return new_state, client.all_finite(server)

  evaluator, predict = workload.make_evaluator(config, model, data, apply_fn, scale)
  exp = Experiment(config=config, data=data, model=model, algorithm=algorithm, lora_scale=scale, freeze_a=freeze_a,
                   train_on_device=jax.tree_util.tree_map(jnp.asarray, data.train), client_matrix=matrix,
                   client_counts=counts, executor=executor, begin_round=jax.jit(begin_round), end_round=jax.jit(end_round),
                   evaluator=evaluator, predict=predict, init_state=init_state,
                   client_bar=client_bar, local_update_for=local_update_for)
  return exp


class NonFiniteError(FloatingPointError):
  """A client's loss or update, or the aggregate, is NaN/inf."""


def sample_clients(config, num_clients: int, round_index: int) -> np.ndarray:
  """The round's clients: all, or `clients_per_round` drawn without replacement (seeded by round)."""
  m = config.fl.clients_per_round or num_clients
  if m >= num_clients:
    return np.arange(num_clients)
  rng = np.random.default_rng([config.seed, round_index, 0x5EED])
  return np.sort(rng.choice(num_clients, size=m, replace=False))


def client_weights(weighting: str, counts: np.ndarray) -> np.ndarray:
  """p_k: data-size weights or uniform, summing to 1."""
  counts = np.asarray(counts, np.float64)
  w = counts / counts.sum() if weighting == "data_size" else np.full(len(counts), 1.0 / len(counts))
  return w.astype(np.float32)


def _take(tree, ids):
  return None if tree is None else jax.tree_util.tree_map(lambda x: x[ids], tree)


def _put(tree, ids, values):
  return None if tree is None else jax.tree_util.tree_map(lambda x, v: x.at[ids].set(v), tree, values)


def communication_bytes(algorithm: Algorithm, trainable, clients_per_round: int) -> dict[str, int]:
  """Bytes one client uploads and downloads per round under the algorithm.

  Parts: 'lora', 'lora_a', 'lora_b', 'head'; 'control' (SCAFFOLD's control variates,
  the size of lora + head); 'lora_stacked' (FLoRA: every sampled client's factors).
  """
  def nbytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))

  entries = lora_lib.lora_entries(trainable["lora"])
  sizes = {"lora": nbytes(trainable["lora"]), "head": nbytes(trainable["head"]),
           "lora_a": nbytes([e["a"] for e in entries.values()]), "lora_b": nbytes([e["b"] for e in entries.values()])}
  sizes["control"] = sizes["lora"] + sizes["head"]
  sizes["lora_stacked"] = sizes["lora"] * clients_per_round
  return {"upload_per_client": sum(sizes[p] for p in algorithm.uploads),
          "download_per_client": sum(sizes[p] for p in algorithm.downloads)}


@dataclasses.dataclass
class LocalUpdates:
  """What the round's clients sent back, before aggregation."""
  ids: np.ndarray                # client ids, sorted
  output: client.ClientOutput    # stacked over `ids`
  weights: jax.Array             # aggregation weights p_k, summing to 1
  extras: Any                    # the clients' algorithm states going in


def local_updates(exp: Experiment, state: RunState, round_index: int) -> LocalUpdates:
  """Client phase of a round: sample, start every client from the server, train locally."""
  config = exp.config
  ids = sample_clients(config, exp.num_clients, round_index)
  ids_on_device = jnp.asarray(ids, jnp.int32)
  inputs, extras = exp.begin_round(state, ids_on_device, jnp.int32(round_index), jnp.int32(config.fl.rounds))
  out = exp.executor({"base": state.server.base, "data": exp.train_on_device}, inputs)
  finite = np.asarray(out.finite)
  if not finite.all():
    raise NonFiniteError(f"Round {round_index + 1}: non-finite loss or update from client(s) "
                         f"{ids[~finite].tolist()}; the run stopped and the last good checkpoint is kept. "
                         f"Lower config.optim.lr or check the data.")
  weights = jnp.asarray(client_weights(config.fl.weighting, exp.client_counts[ids]))
  return LocalUpdates(ids, out, weights, extras)


def run_round(exp: Experiment, state: RunState, round_index: int) -> tuple[RunState, dict]:
  """One federated round; returns the new state and its training record."""
  updates = local_updates(exp, state, round_index)
  ids, out = updates.ids, updates.output
  new_state, finite = exp.end_round(state, out, jnp.asarray(ids, jnp.int32), updates.weights, updates.extras)
  if not bool(finite):
    raise NonFiniteError(f"Round {round_index + 1}: the aggregated global model is non-finite; "
                         f"the run stopped and the last good checkpoint is kept.")
  losses = np.asarray(out.loss, np.float64)
  return new_state, {"round": round_index + 1, "algorithm": exp.algorithm.name,
                     "train_loss": float(losses.mean()), "client_losses": [round(float(x), 6) for x in losses],
                     "clients": ids.tolist()}


def evaluate(exp: Experiment, server: ServerState) -> dict[str, float]:
  """Metrics of the global (merged) model on the eval split."""
  return evaluate_trees(exp, *exp.algorithm.eval_trees(server))


def evaluate_personal(exp: Experiment, state: RunState) -> dict[str, float]:
  """Mean over clients of each client's own model's metrics (personalising algorithms)."""
  per_client = [evaluate_trees(exp, *exp.algorithm.personal_trees(state.server, _take(state.client_extra, k)))
                for k in range(exp.num_clients)]
  return {name: float(np.mean([m[name] for m in per_client])) for name in per_client[0]}


def evaluate_trees(exp: Experiment, base, lora, head) -> dict[str, float]:
  return exp.evaluator(base, lora, head)


def is_eval_round(config, round_number: int) -> bool:
  return round_number % config.eval_every == 0 or round_number == config.fl.rounds


def run(config, workdir: str, model: Optional[models.Model] = None) -> list[dict]:
  """Run (or resume) an experiment in `workdir`; returns this invocation's round records."""
  config_checks.check(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir, config)  # refuses an incompatible resume before any work
  exp = build(config, model)
  state, history = ckpt.restore_latest(exp.init_state())
  start = int(state.round)
  log = run_log.RunLog(workdir, config, history)
  comm = communication_bytes(exp.algorithm, {"lora": state.server.lora, "head": state.server.head},
                             config.fl.clients_per_round or exp.num_clients)
  records, logged = [], state
  if config.eval_before_training and start == 0 and not history:
    record = {"round": 0, "algorithm": exp.algorithm.name, "eval": evaluate(exp, state.server), "clients": []}
    history.append(record)
    log.write(record)
    records.append(record)
  try:
    with log.progress(start, config.fl.rounds) as progress:
      last_round_s = 0.0
      for r in range(start, config.fl.rounds):
        t0 = time.time()
        if exp.client_bar is not None:
          exp.client_bar.start(config.fl.clients_per_round or exp.num_clients, last_round_s)
        state, record = run_round(exp, state, r)
        if exp.client_bar is not None:
          exp.client_bar.stop()
        if is_eval_round(config, r + 1):
          record["eval"] = evaluate(exp, state.server)
          if exp.algorithm.personal_trees is not None:
            record["eval_personal"] = evaluate_personal(exp, state)
        record["seconds"] = last_round_s = round(time.time() - t0, 4)
        record["communication"] = dict(comm, total=(comm["upload_per_client"] + comm["download_per_client"])
                                       * len(record["clients"]))
        history.append(record)
        logged = state
        log.write(record)
        progress.update(record, exp.data.metric)
        records.append(record)
        ckpt.maybe_save(state, r + 1, history, force=(r + 1 == config.fl.rounds))
  except KeyboardInterrupt:
    # Save the last complete round, and make metrics.jsonl say exactly what it holds
    # (the interrupt may have landed between the two writes, or inside one).
    saved_round = int(logged.round)
    ckpt.save_now(logged, saved_round, history)
    log.rewrite([r for r in history if r["round"] <= saved_round])
    print(f"Interrupted: saved round {int(logged.round)} in {workdir}; run the same command to resume.",
          file=sys.stderr)
    raise SystemExit(130)
  finally:
    ckpt.close()
    log.close()
  log.finish()
  return records
