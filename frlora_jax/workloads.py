"""What differs between sequence classification and causal-LM instruction tuning, in one place.

A `Workload` says how to load the model, how the model is applied, the task
loss of a batch, and how a global model is evaluated. The round loop, the
client executors and the server rules are shared and never ask which it is.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from frlora_jax import causal_lm, client, generation, metrics, models, weights
from frlora_jax import lora as lora_lib
from frlora_jax.data import instructions, pad_token_id

Evaluator = Callable[[Any, Any, Any], dict]  # (base, lora, head) -> metrics


@dataclasses.dataclass(frozen=True)
class Workload:
  load_model: Callable[[Any, Any], models.Model]       # (config, data) -> Model
  make_apply: Callable[[models.Model], Callable]       # -> apply(params, batch, rng, deterministic) -> logits
  make_training: Callable                              # (model, config) -> (train apply, task_loss(outputs, batch))
  make_evaluator: Callable[..., tuple[Evaluator, Callable | None]]  # -> (evaluate, predict or None)
  loss_units: Callable                                 # batch -> what task_loss averages over (for grad_accum)


def dtype_of(name: str):
  """A compute or storage dtype by name (float32 | bfloat16 | float16)."""
  return weights.dtype_of(name, "config.model.dtype")


# ----- sequence classification -----

def _load_classifier(config, data) -> models.Model:
  return models.load_classifier(config.model.name, data.num_labels, dtype_of(config.model.dtype),
                                weights.dtype_of(config.model.param_dtype))


def _classification_evaluator(config, model, data, apply_fn, scale: float):
  @jax.jit
  def predict(base, lora, head, batch):
    """Predictions and per-example losses of a global model on one eval batch."""
    params = lora_lib.join_trees(base, head)
    with lora_lib.interceptor(lora, scale):
      logits = apply_fn(params, batch, None, deterministic=True).astype(jnp.float32)
    return jnp.argmax(logits, -1), optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])

  def evaluate(base, lora, head) -> dict:
    predictions, labels, losses = [], [], []
    for batch in data.eval_batches:
      valid = batch["valid"]
      pred, loss = predict(base, lora, head, {k: v for k, v in batch.items() if k != "valid"})
      predictions.append(np.asarray(pred)[valid])
      losses.append(np.asarray(loss)[valid])
      labels.append(batch["labels"][valid])
    result = metrics.classification_metrics(np.concatenate(predictions), np.concatenate(labels), data.num_labels)
    result["loss"] = float(np.concatenate(losses).mean())
    return result

  return evaluate, predict


def _classification_training(model, config):
  return models.make_apply(model), client.softmax_cross_entropy


CLASSIFICATION = Workload(_load_classifier, models.make_apply, _classification_training, _classification_evaluator,
                          client.examples_in)


# ----- causal-LM instruction tuning -----

def token_losses(logits, batch):
  """Next-token cross-entropy per position [B, L-1] and its mask (1 on response tokens)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), batch["input_ids"][:, 1:])
  return ce, batch["loss_mask"][:, 1:].astype(jnp.float32)


def chunked_response_loss(outputs, batch, chunk: int):
  """response_loss from (last hidden state, output kernel), `chunk` positions at a time.

  Each chunk's logits [B, chunk, V] are formed, reduced to its masked cross-entropy sum and
  to the gradient of that sum with respect to the chunk's hidden states, and dropped
  (`_fused_ce_sum`): neither pass holds the [B, L, V] float32 logits (1 GB at 16 x 512 x
  32000), and, unlike recomputing them in the backward pass, no logits are formed twice.
  The output kernel gets no gradient: in causal-LM runs it is part of the frozen base (only
  LoRA trains; models.HEAD_PATTERNS).
  """
  hidden, kernel = outputs
  mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return _fused_ce_sum(kernel, *_shifted_chunks(hidden, batch, chunk)) / jnp.maximum(mask.sum(), 1.0)


def _ce_sum_and_hidden_grad(kernel, hidden_chunks, target_chunks, mask_chunks):
  """(sum of masked cross-entropies over all chunks, its gradient with respect to `hidden_chunks`)."""

  def one_chunk(xs):
    h, t, m = xs
    logits = kernel.logits(h)
    dlogits = (jax.nn.softmax(logits) - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)) * m[..., None]
    return _masked_ce(logits, t, m).sum(), kernel.hidden_grad(dlogits.astype(h.dtype))

  sums, grads = jax.lax.map(one_chunk, (hidden_chunks, target_chunks, mask_chunks))
  return sums.sum(), grads


@jax.custom_vjp
def _fused_ce_sum(kernel, hidden_chunks, target_chunks, mask_chunks):
  return _ce_sum_and_hidden_grad(kernel, hidden_chunks, target_chunks, mask_chunks)[0]


def _fused_ce_sum_forward(kernel, hidden_chunks, target_chunks, mask_chunks):
  return _ce_sum_and_hidden_grad(kernel, hidden_chunks, target_chunks, mask_chunks)  # residual: the hidden gradient


def _fused_ce_sum_backward(hidden_grad, g):
  return None, (g * hidden_grad).astype(hidden_grad.dtype), None, None


_fused_ce_sum.defvjp(_fused_ce_sum_forward, _fused_ce_sum_backward)


def _masked_ce(logits, t, m):
  return optax.softmax_cross_entropy_with_integer_labels(logits, t) * m


def _masked_chunk_ce(kernel, h, t, m):
  """[B, chunk] cross-entropy of one chunk's next tokens t, times the response mask m."""
  return _masked_ce(kernel.logits(h), t, m)


def _shifted_chunks(hidden, batch, chunk: int):
  """(hidden, next-token targets, response mask), each [L / chunk, B, chunk, ...]; for a training
  batch with `response_positions` (data.batching.response_positions) only at those positions,
  so no logits are formed where nothing is trained."""
  if "response_positions" in batch:
    where = batch["response_positions"]
    hidden = jnp.take_along_axis(hidden, where[..., None], axis=1)
    targets = jnp.take_along_axis(batch["input_ids"], where + 1, axis=1)
    mask = batch["response_weights"].astype(jnp.float32)
  else:
    hidden, targets, mask = hidden[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
  chunk = min(chunk, hidden.shape[1])  # never pad a short sequence up to a whole chunk
  return tuple(_sequence_chunks(x, chunk) for x in (hidden, targets, mask))


def _sequence_chunks(x, chunk: int):
  """[B, L, ...] -> [L / chunk, B, chunk, ...], zero-padded to whole chunks."""
  pad = (-x.shape[1]) % chunk
  padded = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(padded.reshape((x.shape[0], -1, chunk) + x.shape[2:]), 1, 0)


def chunked_token_sums(outputs, batch, chunk: int):
  """Per row: (sum of response-token cross-entropies, response tokens), from (last hidden state, output kernel)
  `chunk` positions at a time, so evaluation never holds [B, L, V] float32 logits either."""
  hidden, kernel = outputs
  sums = jax.lax.map(lambda xs: _masked_chunk_ce(kernel, *xs).sum(-1), _shifted_chunks(hidden, batch, chunk))
  return sums.sum(0), batch["loss_mask"][:, 1:].astype(jnp.float32).sum(-1)


def response_loss(logits, batch):
  """Mean cross-entropy over the batch's response tokens only."""
  ce, mask = token_losses(logits, batch)
  return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _load_causal_lm(config, data) -> models.Model:
  return causal_lm.load_causal_lm(config.model.name, dtype_of(config.model.dtype),
                                  weights.dtype_of(config.model.param_dtype), separate_head=targets_lm_head(config))


def _lm_evaluator(config, model, data, apply_fn, scale: float):
  answer_format = config.data.answer_format
  pad_id = pad_token_id(model.tokenizer) if model.tokenizer is not None else 0
  eos_id = model.tokenizer.eos_token_id if model.tokenizer is not None else model.hf_config.eos_token_id
  generate = generation.make_generate(model, scale, config.data.max_new_tokens, eos_id, pad_id)

  chunk = lean_logits_chunk(config)
  forward = causal_lm.make_hidden_apply(model) if chunk else apply_fn

  @jax.jit
  def losses(base, lora, head, batch):
    params = lora_lib.join_trees(base, head)
    with lora_lib.interceptor(lora, scale):
      outputs = forward(params, batch, None, deterministic=True)
    if chunk:
      return chunked_token_sums(outputs, batch, chunk)
    ce, mask = token_losses(outputs, batch)
    return (ce * mask).sum(-1), mask.sum(-1)

  def evaluate(base, lora, head) -> dict:
    total, count = 0.0, 0.0
    for batch in data.eval_batches:
      valid = batch["valid"]
      sums, counts = losses(base, lora, head, {k: v for k, v in batch.items() if k != "valid"})
      total += float(np.asarray(sums, np.float64)[valid].sum())
      count += float(np.asarray(counts, np.float64)[valid].sum())
    loss = total / max(count, 1.0)
    result = {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}
    if data.prompt_batches:
      texts = generate_texts(base, lora, head)
      result["exact_match"] = instructions.exact_match(texts, data.references, answer_format)
      result["answered"] = instructions.answered(texts, data.references, answer_format)
    return result

  def generate_texts(base, lora, head) -> list[str]:
    params = lora_lib.join_trees(base, head)
    texts = [""] * len(data.references)
    for batch in data.prompt_batches:
      tokens = generate(params, lora, batch["input_ids"], batch["attention_mask"])
      for row, text in zip(batch["rows"], generation.decode(model.tokenizer, tokens, eos_id)):
        texts[row] = text
    return texts

  return evaluate, None


def response_tokens(batch):
  """Loss units of an LM batch: its response tokens (response_loss is their mean)."""
  return batch["loss_mask"][:, 1:].astype(jnp.float32).sum()


def targets_lm_head(config) -> bool:
  """Whether LoRA targets the output layer itself."""
  return any(re.search(p, "lm_head") for p in config.lora.targets)


def lean_logits_chunk(config) -> int:
  """Positions per logits chunk (model.logits_chunk), or 0 for full logits: off when LoRA targets the output
  layer itself, which the lean loss computes from the last hidden state without it."""
  if targets_lm_head(config):
    return 0
  return config.model.logits_chunk


def _lm_training(model, config):
  """The lean chunked loss, unless model.logits_chunk is 0 or LoRA targets the output layer itself."""
  chunk = lean_logits_chunk(config)
  if not chunk:
    return causal_lm.make_apply(model), response_loss
  return causal_lm.make_hidden_apply(model), functools.partial(chunked_response_loss, chunk=chunk)


CAUSAL_LM = Workload(_load_causal_lm, causal_lm.make_apply, _lm_training, _lm_evaluator, response_tokens)


def for_config(config) -> Workload:
  return CAUSAL_LM if config.data.kind == "instruction" else CLASSIFICATION
