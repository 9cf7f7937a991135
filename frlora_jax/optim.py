"""Client optimizer: AdamW direction, per-group learning rates, an explicit schedule.

The schedule is a function of an explicit global step rather than of the
optimizer's own count, so the paper's setting (fresh AdamW every round, cosine
over all rounds) and the published code's (AdamW kept across rounds, schedule
over len(loader) * rounds) are the same code with different step inputs;
OpenFedLLM's (constant within a round, cosine across rounds) is `round_cosine`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def warmup_cosine(step, total_steps, warmup_ratio: float):
  """LR multiplier of HF's cosine-with-warmup: linear 0->1, then cosine 1->0."""
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.ceil(warmup_ratio * total)
  warm = step / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, warm, cosine)


def round_cosine(round_start, total_steps, min_ratio: float):
  """OpenFedLLM's schedule as a multiplier of lr: constant within a round, cosine across rounds.

  lr_r = min_lr + (lr - min_lr) (1 + cos(pi r / R)) / 2 with r / R = round_start / total_steps
  (round r starts at step r * local_steps of rounds * local_steps); min_ratio = min_lr / lr.
  """
  progress = jnp.asarray(round_start, jnp.float32) / jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + jnp.cos(jnp.pi * progress))


SCHEDULES = ("warmup_cosine", "round_cosine")


def make_schedule(name: str, *, warmup_ratio: float, lr: float, min_lr: float):
  """(step, round_start, total_steps) -> lr multiplier, for config.optim.schedule."""
  if name == "round_cosine":
    return lambda step, round_start, total: round_cosine(round_start, total, min_lr / lr)
  if name == "warmup_cosine":
    return lambda step, round_start, total: warmup_cosine(step, total, warmup_ratio)
  raise ValueError(f"config.optim.schedule={name!r} is unknown; use one of {', '.join(SCHEDULES)}.")


def adamw_direction(b1: float, b2: float, eps: float, weight_decay: float) -> optax.GradientTransformation:
  """AdamW before the learning rate: adam(g) + wd * param (decoupled decay)."""
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay))


def learning_rates(trained, lora_lr: float, head_lr: float):
  """Per-leaf base learning rate of the trained tree: the LoRA group and the head group."""
  return {
      "lora": jax.tree_util.tree_map(lambda _: lora_lr, trained["lora"]),
      "head": jax.tree_util.tree_map(lambda _: head_lr, trained["head"]),
  }


def apply_step(trainable, updates, rates, multiplier):
  """params - lr(step) * update, leaf by leaf."""
  return jax.tree_util.tree_map(lambda p, u, r: p - (r * multiplier) * u.astype(p.dtype),
                                trainable, updates, rates)
