"""Batched greedy decoding of a LoRA-adapted causal LM, jitted, with and without a KV cache.

Prompts come left-padded so every row's next token lands in the same column.
The cached decoder runs the prompt once, then one token per step against the
cache; the uncached one re-runs the whole buffer each step. They compute the
same tokens (a test holds them to it); the uncached one exists for that check.
Rows that emitted EOS keep emitting padding.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from frlora_jax import causal_lm
from frlora_jax import lora as lora_lib
from frlora_jax.models import Model


def make_generate(model: Model, lora_scale: float, max_new_tokens: int, eos_id: int, pad_id: int,
                  use_cache: bool = True) -> Callable:
  """Jitted `generate(params, lora, input_ids, attention_mask) -> tokens [B, max_new_tokens]`."""
  if use_cache:
    fn = _cached(model, lora_scale, max_new_tokens, eos_id, pad_id)
  else:
    fn = _uncached(model, lora_scale, max_new_tokens, eos_id, pad_id)
  return jax.jit(fn)


def _finish(token, done, eos_id: int, pad_id: int):
  token = jnp.where(done, pad_id, token)
  return token, done | (token == eos_id)


def _cached(model, scale, max_new_tokens, eos_id, pad_id):
  init_cache, step = causal_lm.make_cached_apply(model)

  def generate(params, lora, ids, mask):
    batch, prompt_len = ids.shape
    cache = init_cache(batch, prompt_len + max_new_tokens)
    full_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    pos = causal_lm.positions(mask)
    with lora_lib.interceptor(lora, scale):
      logits, cache = step(params, cache, ids, full_mask, pos)
    first, done = _finish(jnp.argmax(logits[:, -1], -1), jnp.zeros((batch,), bool), eos_id, pad_id)

    def body(carry, _):
      cache, token, last_pos, done = carry
      with lora_lib.interceptor(lora, scale):
        logits, cache = step(params, cache, token[:, None], full_mask, (last_pos + 1)[:, None])
      new, done = _finish(jnp.argmax(logits[:, -1], -1), done, eos_id, pad_id)
      return (cache, new, last_pos + 1, done), new

    _, rest = jax.lax.scan(body, (cache, first, pos[:, -1], done), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)

  return generate


def _uncached(model, scale, max_new_tokens, eos_id, pad_id):
  apply = causal_lm.make_apply(model)

  def generate(params, lora, ids, mask):
    batch, prompt_len = ids.shape
    buf = jnp.concatenate([ids, jnp.full((batch, max_new_tokens), pad_id, ids.dtype)], axis=1)
    buf_mask = jnp.concatenate([mask, jnp.zeros((batch, max_new_tokens), mask.dtype)], axis=1)

    def body(i, carry):
      buf, buf_mask, done = carry
      with lora_lib.interceptor(lora, scale):
        logits = apply(params, {"input_ids": buf, "attention_mask": buf_mask})
      token = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False)
      token, done = _finish(jnp.argmax(token, -1), done, eos_id, pad_id)
      return buf.at[:, prompt_len + i].set(token), buf_mask.at[:, prompt_len + i].set(1), done

    buf, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, buf_mask, jnp.zeros((batch,), bool)))
    return buf[:, prompt_len:]

  return generate


def decode(tokenizer, tokens, eos_id: int) -> list[str]:
  """Generated token rows to text, cut at the first EOS."""
  texts = []
  for row in jax.device_get(tokens).tolist():
    if eos_id in row:
      row = row[:row.index(eos_id)]
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts
