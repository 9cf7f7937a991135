"""Device memory of a config's round from abstract shapes: nothing downloaded but config.json, nothing allocated.

Two views of the same real code path (experiment.model_loss, make_local_update, finish_round):

- `estimate`: from the jaxpr. The run state's bytes follow from shapes and dtypes; the
  activations are what JAX saves for the backward pass of one micro-batch
  (`saved_activations`, in their real dtypes, so bf16 counts as bf16), plus the working set of
  what the backward pass recomputes. No backend is involved.
- `round_programs`: XLA's own buffer plan on this machine's backend (`memory_analysis()` of the
  compiled client update and in-place server step: arguments + outputs - aliased + temporaries).
  On CPU this plan differs from an accelerator's in two ways: XLA:CPU computes bf16 dots in
  float32 (converted copies of operands appear), and its schedule runs the recomputation of
  rematerialised blocks early, so their activations live as long as without remat (measured:
  SmolLM2 shape, JAX's saved activations 2.34 GB -> 78 MB with remat=block, XLA:CPU plan 2.60 ->
  2.41 GB, peak RSS 4.87 -> 4.49 GB, within run-to-run noise). The CPU plan is therefore an upper
  bound for remat runs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frlora_jax import algorithms, causal_lm, client, experiment, models, weights, workloads
from frlora_jax.host_memory import tree_bytes


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One compiled program's memory, in bytes."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @classmethod
  def of(cls, compiled) -> "Compiled":
    m = compiled.memory_analysis()
    return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
               int(m.temp_size_in_bytes))


def _architecture(config, hf_config):
  from transformers import FlaxAutoModelForCausalLM, FlaxAutoModelForSequenceClassification
  compute = workloads.dtype_of(config.model.dtype)
  if config.data.kind == "instruction":
    causal_lm.check_supported(hf_config, config.model.name)
    return FlaxAutoModelForCausalLM.from_config(hf_config, _do_init=False, dtype=compute)
  return FlaxAutoModelForSequenceClassification.from_config(hf_config, _do_init=False, dtype=compute)


def abstract_model(config, hf_config) -> tuple[models.Model, Any]:
  """(Model without params, a function returning its params) from an HF config alone."""
  architecture = _architecture(config, hf_config)
  family = hf_config.model_type

  def params():
    p = architecture.init_weights(jax.random.PRNGKey(0), (1, 8))
    if config.data.kind == "instruction":
      p = causal_lm.drop_tied_head(family, hf_config, causal_lm.to_lora_layout(family, p),
                                   keep=workloads.targets_lm_head(config))
    return p

  model = models.Model(architecture.module, None, family, hf_config, None, config.model.name)
  return experiment.with_scan_setting(model, config), params


def abstract_state(config, model: models.Model, params_fn, algorithm, num_clients: int):
  """The run's state at round 0 as ShapeDtypeStructs (base in config.model.param_dtype, LoRA initialised)."""
  def build():
    loaded = dataclasses.replace(model, params=params_fn())
    base, head = models.base_and_head(loaded, weights.dtype_of(config.model.param_dtype))
    server = experiment.initial_server(config, base, head, algorithm)
    return experiment.fresh_state(config, algorithm, server, num_clients)
  return jax.eval_shape(build)


def abstract_batches(config, clients: int) -> dict:
  """One round's client batches {column: [clients, local_steps, grad_accum * batch, length]} (int32)."""
  rows = config.optim.grad_accum * config.optim.batch_size
  d = config.data
  shape = (clients, config.fl.local_steps, rows, d.pack or d.max_length)
  if d.kind != "instruction":
    batches = {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name in ("input_ids", "attention_mask", "token_type_ids")}
    batches["labels"] = jax.ShapeDtypeStruct(shape[:3], jnp.int32)
    return batches
  columns = ("input_ids", "attention_mask", "loss_mask") + (("segment_ids", "positions") if d.pack else ())
  batches = {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name in columns}
  # The response positions' width depends on the data; every position is the upper bound.
  responses = shape[:3] + (shape[3] - 1,)
  batches.update({name: jax.ShapeDtypeStruct(responses, jnp.int32) for name in ("response_positions", "response_weights")})
  return batches


def _executor_body(config, local_update, clients: int):
  name = client.resolve_executor(config.fl.executor)
  if name == "vmap":
    chunk = config.fl.clients_per_chunk
    return client.vmap_body(local_update, chunk if isinstance(chunk, int) and clients > 1 else 0)
  return client.map_body(local_update)  # map and loop: one client at a time


def _pieces(config, hf_config, clients: int):
  """(algorithm, model without params, abstract round-0 state of `clients` clients): traced once per plan."""
  algorithm = algorithms.from_config(config)
  model, params_fn = abstract_model(config, hf_config)
  return algorithm, model, abstract_state(config, model, params_fn, algorithm, clients)


def _client_start(algorithm, server):
  """The abstract tree a client trains (LoRA + head) at round 0."""
  return jax.eval_shape(lambda s: algorithm.client_start(s, algorithm.init_client_state(s)), server)


def _round(config, pieces, clients: int):
  """Abstract round: (ids, client inputs, their states, executor body) for `clients` of the state's clients."""
  algorithm, model, state = pieces
  ids = jax.ShapeDtypeStruct((clients,), jnp.int32)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  start = functools.partial(experiment.start_round, algorithm=algorithm, plan=experiment.RoundPlan.from_config(config))
  counts = jax.ShapeDtypeStruct(state.client_steps.shape, jnp.int32)
  inputs, client_states = jax.eval_shape(start, state, ids, scalar, scalar, counts)
  inputs = inputs.replace(batches=abstract_batches(config, clients))
  local_update = experiment.make_local_update(config, algorithm, model, config.fl.local_steps)
  return ids, inputs, client_states, _executor_body(config, local_update, clients)


def _server_step(config, pieces, round_, outputs=None) -> Compiled:
  """XLA's plan for the in-place server step of a `_round` (`outputs`: the clients' abstract outputs, traced if
  not given)."""
  algorithm, _, state = pieces
  ids, inputs, client_states, body = round_
  if outputs is None:
    outputs = jax.eval_shape(body, {"base": state.server.base}, inputs)
  weights_ = jax.ShapeDtypeStruct(ids.shape, jnp.float32)
  return Compiled.of(experiment.finish_round_in_place.lower(state, outputs, ids, weights_, client_states,
                                                            algorithm=algorithm,
                                                            local_steps=config.fl.local_steps).compile())


def server_step_program(config, hf_config, clients: int) -> Compiled:
  """XLA's plan for the in-place server step of `clients` clients (no model is compiled)."""
  pieces = _pieces(config, hf_config, max(clients, config.fl.num_clients))
  return _server_step(config, pieces, _round(config, pieces, clients))


def round_programs(config, hf_config, clients: int) -> dict:
  """XLA's plans for `clients` clients' local updates (the config's executor) and the server step."""
  pieces = _pieces(config, hf_config, max(clients, config.fl.num_clients))
  state = pieces[2]
  round_ = _round(config, pieces, clients)
  _, inputs, _, body = round_
  shared = {"base": state.server.base}
  update = jax.jit(body).lower(shared, inputs).compile()
  return {"client_update": Compiled.of(update),
          "server_step": _server_step(config, pieces, round_, jax.eval_shape(body, shared, inputs)),
          "state": tree_bytes(state), "base": tree_bytes(state.server.base)}


def _saved_activations(config, pieces, remat_mode: str) -> int:
  from jax._src import ad_checkpoint
  config = config.copy_and_resolve_references()
  config.model.remat = remat_mode
  algorithm, model, state = pieces
  start = _client_start(algorithm, state.server)
  batch = {name: jax.ShapeDtypeStruct((config.optim.batch_size,) + x.shape[3:], x.dtype)
           for name, x in abstract_batches(config, 1).items()}  # one micro-batch of one client
  loss = experiment.model_loss(config, model)
  found = []

  def trace(base, trainable, batch):
    found.extend(ad_checkpoint.saved_residuals(lambda t: loss(t, base, batch, jax.random.PRNGKey(0)), trainable))
    return jnp.zeros(())

  jax.eval_shape(trace, state.server.base, start, batch)
  return int(sum(np.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize for aval, source in found
                 if not source.startswith("from a constant") and "argument" not in source))


def saved_activations(config, hf_config, remat_mode: str | None = None) -> int:
  """Bytes JAX saves for the backward pass of one micro-batch (jaxpr residuals in their real dtypes, excluding
  the weights themselves), under `remat_mode` (default: config.model.remat). Backend-independent."""
  return _saved_activations(config, _pieces(config, hf_config, 1), remat_mode or config.model.remat)


def estimate(config, hf_config) -> dict[str, int]:
  """Device bytes of a round from the jaxpr, independent of any backend's scheduler.

  fixed: the whole run state (base as stored, LoRA, head, every client's kept states);
  per client: its batches, its trained tree four times (values, gradients, AdamW's two
  moments), the activations saved for one micro-batch's backward under config.model.remat, and
  the working set of what is recomputed (one block's activations for block/policies, all of
  them for full, since the backward pass rebuilds them). The server step (aggregation, FRLoRA's
  base update) runs after the clients: its peak is XLA's plan for it (no dots of the model, so
  the CPU plan holds no upcast copies), reported beside.
  """
  pieces = _pieces(config, hf_config, config.fl.num_clients)
  algorithm, _, state = pieces
  mode = config.model.remat
  saved = _saved_activations(config, pieces, mode)
  without = saved if mode == "none" else _saved_activations(config, pieces, "none")
  layers = int(getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer)
  working = {"none": 0, "full": without}.get(mode, without // layers)
  batches, trained = tree_bytes(abstract_batches(config, 1)), 4 * tree_bytes(_client_start(algorithm, state.server))
  per_client = batches + trained + saved + working
  server = _server_step(config, pieces, _round(config, pieces, config.fl.clients_per_round or config.fl.num_clients))
  return {"fixed_bytes": tree_bytes(state), "base_bytes": tree_bytes(state.server.base),
          "per_client_bytes": per_client, "saved_activation_bytes": saved, "saved_without_remat_bytes": without,
          "recompute_working_set_bytes": working, "batch_bytes": batches, "trained_tree_x4_bytes": trained,
          "server_step_peak_bytes": server.peak}
