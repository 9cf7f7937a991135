"""Tokenized, fixed-shape arrays with a few length buckets.

Training rows are padded to the smallest bucket that holds the longest
training example (so short-sentence data is not padded to max_length, and
every local step has the same shape). Evaluation batches are sorted by length
and each padded to its own bucket: a handful of compiled shapes in all (or, with
config.data.eval_buckets False, all to the longest batch's bucket: one shape).
"""
from __future__ import annotations

import os

import numpy as np

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def bucket_length(longest: int, max_length: int) -> int:
  for b in BUCKETS:
    if b >= longest:
      return min(b, max_length)
  return max_length


def tokenize(tokenizer, texts: list[list[str]], max_length: int) -> dict[str, list]:
  """texts: one list per text field (1 or 2 fields); truncates to max_length."""
  first = [str(t) for t in texts[0]]
  second = [str(t) for t in texts[1]] if len(texts) > 1 else None
  return dict(tokenizer(first, second, truncation=True, max_length=max_length))


def pad_rows(encoded: dict[str, list], rows, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Selected rows as [len(rows), length] int32 arrays (input_ids, attention_mask, ...)."""
  out = {}
  for name, values in encoded.items():
    fill = pad_id if name == "input_ids" else 0
    array = np.full((len(rows), length), fill, np.int32)
    for i, r in enumerate(rows):
      seq = values[r][:length]
      array[i, :len(seq)] = seq
    out[name] = array
  return out


def lengths(encoded: dict[str, list]) -> np.ndarray:
  return np.array([len(ids) for ids in encoded["input_ids"]], np.int64)


def train_arrays(encoded, labels, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
  length = bucket_length(int(lengths(encoded).max()), max_length)
  arrays = pad_rows(encoded, np.arange(len(labels)), length, pad_id)
  arrays["labels"] = np.asarray(labels, np.int32)
  return arrays


def length_sorted_batches(sizes, batch_size: int, max_length: int, buckets: bool = True):
  """Yield (rows, padded rows, bucket length) over rows sorted by size, in batches of exactly
  batch_size: the last batch repeats its first row, and rows are the real ones.
  buckets=False: every batch gets one shape, the longest row rounded up to a multiple of 16 (less padding than
  its power-of-two bucket, and still a single compiled program)."""
  sizes = np.asarray(sizes)
  order = np.argsort(sizes, kind="stable")
  longest = min(-(-int(sizes.max()) // 16) * 16, max_length) if len(sizes) else max_length
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    padded = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])
    yield rows, padded, bucket_length(int(sizes[rows].max()), max_length) if buckets else longest


def eval_batches(encoded, labels, batch_size: int, max_length: int, pad_id: int,
                 buckets: bool = True) -> list[dict[str, np.ndarray]]:
  """Length-sorted batches of exactly batch_size rows; `valid` marks the real ones."""
  labels = np.asarray(labels, np.int32)
  batches = []
  for rows, padded, length in length_sorted_batches(lengths(encoded), batch_size, max_length, buckets):
    batch = pad_rows(encoded, padded, length, pad_id)
    batch["labels"] = labels[padded]
    batch["valid"] = np.arange(batch_size) < len(rows)
    batches.append(batch)
  return batches


def lm_arrays(ids: list[list[int]], loss_mask: list[list[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded [N, length] input_ids, attention_mask and loss_mask for causal-LM training."""
  return _filled_rows(ids, loss_mask, [[i] for i in range(len(ids))], length, pad_id, packed=False)


SHARED_PREFIX_SEGMENT = -1  # segment id of a packed row's shared prefix: every example in the row attends to it


def _filled_rows(ids, loss_mask, rows: list[list[int]], length: int, pad_id: int, packed: bool,
                 prefix: int = 0) -> dict[str, np.ndarray]:
  """Each row's examples laid end to end from position 0, then padding; with `packed`, also
  `segment_ids` (1, 2, ... per example; 0 on padding) and `positions` restarting for each example.
  With `prefix` > 0 (the first `prefix` tokens of every example are the same), a row starts with those
  tokens once (segment SHARED_PREFIX_SEGMENT) and holds each example's remainder, positions from `prefix`."""
  names = ("input_ids", "attention_mask", "loss_mask") + (("segment_ids", "positions") if packed else ())
  out = {name: np.zeros((len(rows), length), np.int32) for name in names}
  out["input_ids"][:] = pad_id
  for r, members in enumerate(rows):
    start = 0
    if prefix:
      out["input_ids"][r, :prefix] = ids[members[0]][:prefix]
      out["attention_mask"][r, :prefix] = 1
      out["segment_ids"][r, :prefix] = SHARED_PREFIX_SEGMENT
      out["positions"][r, :prefix] = np.arange(prefix)
      start = prefix
    for segment, i in enumerate(members, 1):
      end = start + len(ids[i]) - prefix
      out["input_ids"][r, start:end] = ids[i][prefix:]
      out["attention_mask"][r, start:end] = 1
      out["loss_mask"][r, start:end] = loss_mask[i][prefix:]
      if packed:
        out["segment_ids"][r, start:end] = segment
        out["positions"][r, start:end] = np.arange(prefix, prefix + end - start)
      start = end
  return out


def shared_prefix_length(ids: list[list[int]], loss_mask: list[list[int]]) -> int:
  """How many leading tokens every example shares and can share in a packed row: the common token prefix,
  cut so that its last position predicts a prompt token (at a shared position only one target fits)."""
  if not ids:
    return 0
  common = len(os.path.commonprefix([list(s) for s in ids]))  # element-wise: works on token lists
  first_response = min(int(np.argmax(np.asarray(m) > 0)) if any(m) else len(m) for m in loss_mask)
  return max(0, min(common, first_response - 1))


def lm_eval_batches(ids, loss_mask, batch_size: int, max_length: int, pad_id: int,
                    buckets: bool = True) -> list[dict[str, np.ndarray]]:
  """Length-sorted, bucket-padded batches of exactly batch_size rows; `valid` marks the real ones."""
  batches = []
  for rows, padded, length in length_sorted_batches([len(s) for s in ids], batch_size, max_length, buckets):
    batch = lm_arrays([ids[r] for r in padded], [loss_mask[r] for r in padded], length, pad_id)
    batch["valid"] = np.arange(batch_size) < len(rows)
    batches.append(batch)
  return batches


def prompt_batches(prompts: list[list[int]], batch_size: int, max_length: int, pad_id: int,
                   buckets: bool = True) -> list[dict]:
  """Left-padded prompt batches (generation appends on the right); `rows` are indices into `prompts`."""
  batches = []
  for rows, padded, length in length_sorted_batches([len(p) for p in prompts], batch_size, max_length, buckets):
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, r in enumerate(padded):
      seq = prompts[r][-length:]
      ids[i, length - len(seq):] = seq
      mask[i, length - len(seq):] = 1
    batches.append({"input_ids": ids, "attention_mask": mask, "rows": rows})
  return batches


def pack_examples(lengths_, order, length: int) -> list[list[int]]:
  """Greedy packing: examples taken in `order` fill rows of at most `length` tokens; each row
  is the list of its examples. An example that does not fit the current row starts the next."""
  rows, current, used = [], [], 0
  for i in order:
    n = int(lengths_[i])
    if current and used + n > length:
      rows.append(current)
      current, used = [], 0
    current.append(int(i))
    used += n
  if current:
    rows.append(current)
  return rows


def packed_lm_arrays(ids, loss_mask, rows: list[list[int]], length: int, pad_id: int,
                     prefix: int = 0) -> dict[str, np.ndarray]:
  """lm_arrays for packed rows (each a list of examples), plus `segment_ids`, which keep attention
  inside each example, and `positions`, restarting at 0 for each example (or continuing a shared
  `prefix` laid once per row: see _filled_rows)."""
  return _filled_rows(ids, loss_mask, rows, length, pad_id, packed=True, prefix=prefix)


def response_positions(loss_mask: np.ndarray, multiple: int = 8) -> dict[str, np.ndarray]:
  """Per row, the positions whose next token is a response token ([N, R], R the most in any row,
  rounded up to `multiple`), with `response_weights` 1 on real entries: the LM loss forms logits
  only there instead of at every position (prompt and padding logits are never trained)."""
  targets = loss_mask[:, 1:] > 0
  counts = targets.sum(-1)
  width = max(1, int(counts.max()) if len(counts) else 1)
  width = min(-(-width // multiple) * multiple, loss_mask.shape[1] - 1)
  positions = np.zeros((len(loss_mask), width), np.int32)
  weights = np.zeros((len(loss_mask), width), np.int32)
  for r, row in enumerate(targets):
    where = np.flatnonzero(row)[:width]
    positions[r, :len(where)] = where
    weights[r, :len(where)] = 1
  return {"response_positions": positions, "response_weights": weights}
