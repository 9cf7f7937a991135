"""Dropout masks from packed random bits.

Why: `jax.random.bernoulli` spends one 32-bit threefry draw per element, and at
MiniLM shape the model's and LoRA's dropout bits cost about a fifth of a CPU
training step. Here each 32-bit word is split into 4 bytes (or 2 half-words), one
per element, so threefry runs 4x (2x) less. The drop probability becomes
round(rate * 2**bits) / 2**bits (0.1 -> 0.1016 with 8 bits, 0.100006 with 16) and
kept units are scaled by the inverse of that keep probability, so activations
stay unbiased. `bits=32` is `jax.random.bernoulli` itself (Flax's own dropout).
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

BITS = (8, 16, 32)
_UINT = {8: jnp.uint8, 16: jnp.uint16}


def _threshold(rate: float, bits: int) -> int:
  """Draws below this (out of 2**bits) are dropped."""
  return round(rate * 2 ** bits)


def drop_probability(rate: float, bits: int) -> float:
  """The drop probability `keep_mask` actually uses for `rate` at `bits`."""
  if bits == 32:
    return rate
  return _threshold(rate, bits) / 2 ** bits


def keep_mask(key, rate: float, shape, bits: int = 8):
  """Boolean mask, True with probability 1 - drop_probability(rate, bits)."""
  if bits == 32:
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  if bits not in _UINT:
    raise ValueError(f"dropout bits={bits}; use one of {BITS}.")
  size = math.prod(shape)
  per_word = 32 // bits
  words = jax.random.bits(key, (-(-size // per_word),), jnp.uint32)
  draws = jax.lax.bitcast_convert_type(words, _UINT[bits]).reshape(-1)[:size].reshape(shape)
  return draws >= jnp.asarray(_threshold(rate, bits), _UINT[bits])


def dropout(x, rate: float, key, bits: int = 8, mask_shape=None):
  """Inverted dropout of `x`; `mask_shape` (broadcastable to x.shape) shares a mask over axes."""
  if rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(key, rate, x.shape if mask_shape is None else tuple(mask_shape), bits)
  keep = jnp.broadcast_to(keep, x.shape)
  return jnp.where(keep, x / (1.0 - drop_probability(rate, bits)), 0).astype(x.dtype)


def interceptor(bits: int):
  """Routes every `flax.linen.Dropout` call inside the context through `dropout` at `bits`.

  HF Flax models build their hidden-state dropouts from `nn.Dropout`, so this
  reaches them without touching the library. Same RNG stream (the module's own
  `make_rng`), same determinism rules as Flax's Dropout. At 32 bits nothing is
  intercepted: Flax's Dropout already is `jax.random.bernoulli`.
  """
  if bits == 32:
    return contextlib.nullcontext()

  def route(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dropout):
      return next_fun(*args, **kwargs)
    inputs = args[0]
    call_deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
    if nn.merge_param("deterministic", module.deterministic, call_deterministic):
      return inputs
    rng = kwargs.get("rng", args[2] if len(args) > 2 else None)
    if rng is None and module.rate not in (0.0, 1.0):
      rng = module.make_rng(module.rng_collection)
    shared = {d % inputs.ndim for d in module.broadcast_dims}
    mask_shape = [1 if d in shared else n for d, n in enumerate(inputs.shape)]
    return dropout(inputs, module.rate, rng, bits, mask_shape)

  return nn.intercept_methods(route)
