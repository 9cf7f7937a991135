"""Orbax checkpoints of the whole run state, resume, and restore-for-use.

A checkpoint holds `RunState` (residual base, global LoRA and head, the
algorithm's server and client states, kept optimizer states, per-client step
counts, the round index) and the metrics records so far. RNG keys and client
sampling are functions of (seed, round), so they need no saving. Orbax writes
each step into a temporary folder and renames it when complete, so a save cut
off mid-write is never picked up; a complete checkpoint that fails to restore
(corrupted on disk) is skipped for the one before it; if none restores, the run
stops rather than start over on top of its own log. Saves run asynchronously
beside the next round.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax.serialization
from absl import logging
import ml_collections
import orbax.checkpoint as ocp

from frlora_jax import run_log

# Fields that may change on resume without changing what the run computes.
RESUMABLE_CHANGES = {
    "fl.rounds", "fl.executor", "fl.clients_per_chunk", "eval_every", "eval_batch_size",
    "checkpoint_every", "keep_checkpoints", "data.max_eval_examples",
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


class Checkpointer:
  """Saves every `config.checkpoint_every` rounds, keeps the last `config.keep_checkpoints`."""

  def __init__(self, workdir: str, config, async_save: bool = True):
    self.every = config.checkpoint_every
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, config.keep_checkpoints),
                                             enable_async_checkpointing=async_save, create=True))
    id_path = os.path.join(workdir, IDENTITY_FILE)
    if self.manager.latest_step() is not None and os.path.exists(id_path):
      with open(id_path) as f:
        check_compatible(json.load(f), config)
    run_log.write_atomic(id_path, json.dumps(identity(config), indent=1, sort_keys=True) + "\n")

  def restore_latest(self, template) -> tuple[Any, list[dict]]:
    """(state, metrics records) of the newest checkpoint that restores, or (template, []) if none exist.

    Checkpoints that exist but none of which restores (all damaged, or written by
    an incompatible version) stop the run: starting over would overwrite its log.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(flax.serialization.to_state_dict(template)),
            metrics=ocp.args.JsonRestore()))
      except Exception as e:  # corrupted on disk: fall back to the previous checkpoint
        failures.append(f"step {step}: {str(e).splitlines()[0][:200]}")
        logging.warning("Checkpoint %d in %s does not restore (%s); trying the one before.", step,
                        self.directory, failures[-1])
        continue
      return flax.serialization.from_state_dict(template, restored.state), list(restored.metrics)
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
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        metrics=ocp.args.JsonSave([r for r in metrics if r["round"] <= step])))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_state(workdir: str, step: Optional[int] = None) -> tuple[dict, int]:
  """The raw saved state dict (nested dicts of arrays) and its step."""
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir} has no complete checkpoint; run train.py with --workdir {workdir} first.")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state, step
  finally:
    manager.close()


def restore_parts(workdir: str, step: Optional[int] = None) -> tuple[Any, Any, Any, ml_collections.ConfigDict]:
  """(base, lora, head, config) of the global model, unmerged (for adapter export)."""
  from frlora_jax import algorithms
  config = load_config(workdir)
  raw, _ = restore_state(workdir, step)
  base, lora, head = algorithms.from_config(config).eval_trees(algorithms.ServerState(**raw["server"]))
  return base, lora, head, config


def restore(workdir: str, step: Optional[int] = None) -> tuple[dict, ml_collections.ConfigDict]:
  """Merged global model params (base with LoRA folded in, head joined) and the run's config.

  Pure: builds nothing but the parameter tree, so it is cheap in a notebook.
  """
  from frlora_jax import lora as lora_lib
  base, lora, head, config = restore_parts(workdir, step)
  merged = lora_lib.merge(base, lora, lora_lib.scale(config.lora))
  return lora_lib.join_trees(merged, head), config
