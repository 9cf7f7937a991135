"""Orbax checkpoints of what a run changes, resume, and restore-for-use.

A checkpoint holds `RunState` less the untouched part of the frozen base: the
LoRA-targeted kernels (FRLoRA's residual, in float32 where it accumulates), the
global LoRA and head, the algorithm's server and client states, kept optimizer
states, per-client step counts, the round index, and the metrics records so far.
The rest of the base is rebuilt from the pre-trained weights, whose fingerprint
is saved beside it: a checkpoint is refused if they changed. RNG keys and client
sampling are functions of (seed, round), so they need no saving. Orbax writes
each step into a temporary folder and renames it when complete, so a save cut
off mid-write is never picked up; a complete checkpoint that fails to restore
(corrupted on disk) is skipped for the one before it; if none restores, the run
stops rather than start over on top of its own log. Saves run asynchronously
beside the next round.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import flax.serialization
import jax
import numpy as np
from absl import logging
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from frlora_jax import lora as lora_lib
from frlora_jax import run_log

# Fields that may change on resume without changing what the run computes.
RESUMABLE_CHANGES = {
    "fl.rounds", "fl.executor", "fl.clients_per_chunk", "eval_every", "eval_batch_size",
    "checkpoint_every", "keep_checkpoints", "data.max_eval_examples", "data.eval_buckets",
    "client_progress",
}
IDENTITY_FILE = "experiment.json"


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def identity(config) -> dict:
  """The config fields that define the experiment (all but the resumable ones)."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  return {k: v for k, v in sorted(flat.items()) if k not in RESUMABLE_CHANGES}


def check_compatible(saved: dict, config) -> None:
  """Refuse to resume under settings that change what the run computes.

  A field missing from the saved identity was added to the project after the run
  started; it matches when it still has its default (defaults keep the old behaviour).
  """
  from frlora_jax import defaults
  current = identity(config)
  default = identity(defaults.get_config())
  changed = sorted(k for k in set(saved) | set(current)
                   if saved.get(k, default.get(k)) != current.get(k))
  if changed:
    details = "; ".join(f"config.{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in changed[:6])
    raise ValueError(f"Refusing to resume: this workdir holds a different experiment ({details}). "
                     f"Use a new --workdir, or restore the original settings. Only "
                     f"{', '.join(sorted('config.' + f for f in RESUMABLE_CHANGES))} may change on resume.")


def fingerprint(params) -> str:
  """A digest of every leaf's path, dtype, shape and bytes: identifies the pre-trained base."""
  digest = hashlib.blake2b(digest_size=16)
  for key, leaf in sorted(traverse_util.flatten_dict(params).items()):
    array = np.asarray(leaf)
    digest.update(f"{'/'.join(key)}:{array.dtype}:{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def targeted_kernels(server):
  """The base's LoRA-targeted kernels (all a run changes in it), nested like the base."""
  return traverse_util.unflatten_dict({path + ("kernel",): lora_lib.get_kernel(server.base, path)
                                       for path in lora_lib.lora_entries(server.lora)})


def lean(state):
  """`state` with the base reduced to its LoRA-targeted kernels."""
  return state.replace(server=state.server.replace(base=targeted_kernels(state.server)))


def with_saved_kernels(base, saved_base):
  """`base` (pre-trained, or the run's initial one) with the kernels of a lean checkpoint's base."""
  kernels = {key[:-1]: value for key, value in traverse_util.flatten_dict(saved_base).items()}
  return lora_lib.replace_kernels(base, kernels)


def with_base(lean_state, base):
  """The full state: `base` with the saved targeted kernels."""
  return lean_state.replace(server=lean_state.server.replace(base=with_saved_kernels(base, lean_state.server.base)))


def _check_base(saved: dict, base_fingerprint: str, where: str, model_name: str) -> None:
  if saved.get("fingerprint") != base_fingerprint:
    raise ValueError(f"{where} was saved on top of pre-trained weights with fingerprint {saved.get('fingerprint')} "
                     f"({saved.get('model')!r}), but config.model.name={model_name!r} now loads weights with "
                     f"fingerprint {base_fingerprint}. A checkpoint stores only what the run changed, so it needs "
                     f"the same weights: point config.model.name at them, or start a new --workdir.")


class Checkpointer:
  """Saves every `config.checkpoint_every` rounds, keeps the last `config.keep_checkpoints`."""

  def __init__(self, workdir: str, config, async_save: bool = True):
    self.every = config.checkpoint_every
    self.model_name = config.model.name
    self.base_fingerprint: Optional[str] = None  # set by restore_latest
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, config.keep_checkpoints),
                                             enable_async_checkpointing=async_save, create=True))
    id_path = os.path.join(workdir, IDENTITY_FILE)
    if self.manager.latest_step() is not None and os.path.exists(id_path):
      with open(id_path) as f:
        check_compatible(json.load(f), config)
    if jax.process_index() == 0:  # one writer in a multi-process run (the workdir is shared)
      run_log.write_atomic(id_path, json.dumps(identity(config), indent=1, sort_keys=True) + "\n")

  def restore_latest(self, template, base_fingerprint: str) -> tuple[Any, list[dict]]:
    """(state, metrics records) of the newest checkpoint that restores, or (template, []) if none exist.

    template: the run's initial state (its base fills in what checkpoints leave out);
    base_fingerprint: `fingerprint` of the pre-trained base it was built from, saved with
    every checkpoint and checked on restore. Checkpoints that exist but none of which
    restores (all damaged, or written by an incompatible version) stop the run: starting
    over would overwrite its log.
    """
    self.base_fingerprint = base_fingerprint
    failures = []
    item = flax.serialization.to_state_dict(lean(template))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        on_disk = set(ocp.StandardCheckpointHandler().metadata(
            epath.Path(self.directory) / str(step) / "state").keys())
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({k: v for k, v in item.items() if k in on_disk}),
            metrics=ocp.args.JsonRestore(), base=ocp.args.JsonRestore()))
      except Exception as e:  # corrupted on disk: fall back to the previous checkpoint
        failures.append(f"step {step}: {str(e).splitlines()[0][:200]}")
        logging.warning("Checkpoint %d in %s does not restore (%s); trying the one before.", step,
                        self.directory, failures[-1])
        continue
      _check_base(restored.base, base_fingerprint, os.path.join(self.directory, str(step)), self.model_name)
      missing = {field: value for field, value in item.items() if field not in restored.state}
      if any(value is not None for value in missing.values()):
        raise ValueError(f"checkpoint {step} has no {', '.join(sorted(missing))}: it was written by a run "
                         f"without them (an older version or other settings)")
      state = flax.serialization.from_state_dict(lean(template), dict(restored.state, **missing))
      return with_base(state, template.server.base), list(restored.metrics)
    if failures:
      raise RuntimeError(f"No checkpoint in {self.directory} restores ({'; '.join(failures)}). Nothing was "
                         f"changed. To start this run over, move that folder and metrics.jsonl away; to keep it, "
                         f"resume with the frlora_jax version that wrote it.")
    return template, []

  def maybe_save(self, state, step: int, metrics: list[dict], force: bool = False) -> None:
    if self.every and (step % self.every == 0 or force):
      self.save_now(state, step, metrics)

  def save_now(self, state, step: int, metrics: list[dict]) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(lean(state))),
        metrics=ocp.args.JsonSave([r for r in metrics if r["round"] <= step]),
        base=ocp.args.JsonSave({"fingerprint": self.base_fingerprint, "model": self.model_name})))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's saved config; fields added to the project since it was written take their defaults
  (which keep the old behaviour, as `check_compatible` assumes)."""
  with open(os.path.join(workdir, "config.json")) as f:
    return config_from_json(f.read())


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A config from its JSON (`to_json_best_effort`), on top of the defaults of fields it lacks."""
  from frlora_jax import defaults
  config = defaults.get_config().to_dict()
  _merge(config, json.loads(text))
  return ml_collections.ConfigDict(config)


def _merge(into: dict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(into.get(key), dict):
      _merge(into[key], value)
    else:
      into[key] = value


def restore_state(workdir: str, step: Optional[int] = None) -> tuple[dict, int, dict]:
  """The raw saved (lean) state dict (nested dicts of arrays), its step, and its base record."""
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir} has no complete checkpoint; run train.py with --workdir {workdir} first.")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             base=ocp.args.JsonRestore()))
    return restored.state, step, restored.base
  finally:
    manager.close()


def pretrained_base(config, head) -> Any:
  """The run's pre-trained base (stored as the run stored it), loaded again from config.model.name."""
  from frlora_jax import causal_lm, models, weights, workloads
  compute, storage = weights.dtype_of(config.model.dtype), weights.dtype_of(config.model.param_dtype)
  if config.data.kind == "instruction":
    model = causal_lm.load_causal_lm(config.model.name, compute, storage, workloads.targets_lm_head(config))
  else:
    classifier = head["classifier"]
    num_labels = int(np.shape(classifier.get("kernel", classifier.get("out_proj", {}).get("kernel")))[-1])
    model = models.load_classifier(config.model.name, num_labels, compute, storage)
  return models.base_and_head(model, storage)[0]


def restore_parts(workdir: str, step: Optional[int] = None) -> tuple[Any, Any, Any, ml_collections.ConfigDict]:
  """(base, lora, head, config) of the global model, unmerged (for adapter export)."""
  from frlora_jax import algorithms
  config = load_config(workdir)
  raw, step, saved_base = restore_state(workdir, step)
  server = raw["server"]
  base = pretrained_base(config, server["head"])
  _check_base(saved_base, fingerprint(base), os.path.join(workdir, "checkpoints", str(step)), config.model.name)
  server = algorithms.ServerState(**dict(server, base=with_saved_kernels(base, server["base"])))
  base, lora, head = algorithms.from_config(config).eval_trees(server)
  return base, lora, head, config


def restore(workdir: str, step: Optional[int] = None) -> tuple[dict, ml_collections.ConfigDict]:
  """Merged global model params (base with LoRA folded in, head joined) and the run's config.

  Pure: builds nothing but the parameter tree, so it is cheap in a notebook.
  """
  from frlora_jax import lora as lora_lib
  base, lora, head, config = restore_parts(workdir, step)
  merged = lora_lib.merge(base, lora, lora_lib.scale(config.lora))
  return lora_lib.join_trees(merged, head), config
