"""Client optimizer: AdamW direction, per-group learning rates, an explicit schedule.

The schedule is a function of an explicit global step rather than of the
optimizer's own count, so the paper's setting (fresh AdamW every round, cosine
over all rounds) and the published code's (AdamW kept across rounds, schedule
over len(loader) * rounds) are the same code with different step inputs.
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
