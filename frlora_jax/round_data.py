"""The training set stays on the host; each round moves only its clients' batches to the device.

Client k's batch for local step i is the rows `indices_k[randint(k_batch, (n,), 0, count_k)]`
with k_batch = split(fold_in(key_k, i))[0] and key_k the client's key for the round: the
same draw the local update used to make on the device, so results are unchanged. The row ids
are drawn by one small jitted function, the rows gathered with NumPy, and the round's
`[clients, steps, rows, ...]` arrays put on the device; the next round's are prepared in a
background thread while the current one trains. Device memory no longer grows with the
dataset, only with clients x steps x batch.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from frlora_jax import rng
from frlora_jax.data import partition


@functools.partial(jax.jit, static_argnames=("seed", "steps", "rows_per_step", "distinct"))
def draw_rows(round_index, ids, indices, counts, *, seed: int, steps: int, rows_per_step: int,
              distinct: bool = False):
  """[clients, steps, rows_per_step] train-set rows of the round's clients `ids`.

  Each row is drawn uniformly from the client's examples, independently (with replacement), or with
  distinct=True as min(count, rows_per_step) different examples (without replacement) in the first
  slots, the rest of a smaller client's rows being filler that `example_weights` weighs 0: DP-SGD bounds
  each example's part of a step by one clipped gradient, which a repeated row breaks.
  """
  def client_rows(key, client_indices, count):
    def step_rows(i):
      k_batch, _ = jax.random.split(jax.random.fold_in(key, i))
      if distinct:  # the first rows_per_step of a uniform random order of the client's `count` examples
        order = jax.random.uniform(k_batch, client_indices.shape)
        order = jnp.where(jnp.arange(client_indices.shape[0]) < count, order, jnp.inf)
        return client_indices[jax.lax.top_k(-order, rows_per_step)[1]]
      return client_indices[jax.random.randint(k_batch, (rows_per_step,), 0, count)]
    return jax.vmap(step_rows)(jnp.arange(steps))

  return jax.vmap(client_rows)(rng.round_keys(seed, round_index, ids), indices[ids], counts[ids])


def example_weights(counts: np.ndarray, shape: tuple) -> np.ndarray:
  """[clients, steps, rows] float32: 1 for a distinct draw's real examples, 0 for a small client's filler."""
  return np.broadcast_to(np.arange(shape[-1]) < np.asarray(counts)[:, None, None], shape).astype(np.float32)


class RoundBatches:
  """Host-side train columns and client partition; `for_round` gives a round's device batches."""

  def __init__(self, columns: dict, client_indices: list, *, seed: int, steps: int, rows_per_step: int,
               on_device: bool = True, distinct: bool = False):
    """on_device=False: `for_round` gives host arrays (a multi-process run feeds them to the global mesh);
    distinct: each step's rows are different examples (draw_rows; sample-level DP)."""
    self.columns = {name: np.asarray(column) for name, column in columns.items()}
    indices, self.counts = partition.pack(client_indices)  # counts: [K] int32 on the host
    if distinct and indices.shape[1] < rows_per_step:  # every client smaller than a step: room for its filler
      indices = np.pad(indices, ((0, 0), (0, rows_per_step - indices.shape[1])))
    self.indices, self._device_counts = jnp.asarray(indices), jnp.asarray(self.counts)  # [K, max_n] int32: small
    self.on_device = on_device
    self.seed, self.steps, self.rows_per_step, self.distinct = seed, steps, rows_per_step, distinct
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: Optional[tuple] = None  # (round_index, ids, future)

  def rows(self, round_index: int, ids: np.ndarray) -> np.ndarray:
    return np.asarray(draw_rows(jnp.int32(round_index), jnp.asarray(ids, jnp.int32), self.indices, self._device_counts,
                                seed=self.seed, steps=self.steps, rows_per_step=self.rows_per_step,
                                distinct=self.distinct))

  def _build(self, round_index: int, ids: np.ndarray) -> dict:
    rows = self.rows(round_index, ids)
    place = jax.device_put if self.on_device else (lambda x: x)
    batches = {name: place(column[rows]) for name, column in self.columns.items()}
    if self.distinct:
      batches["example_weights"] = place(example_weights(self.counts[ids], rows.shape))
    return batches

  def for_round(self, round_index: int, ids: np.ndarray, next_round: Optional[tuple] = None) -> dict:
    """The round's batches {column: [clients, steps, rows, ...]} on the device; starts preparing
    `next_round` = (round_index, ids) in the background."""
    pending, self._pending = self._pending, None
    if pending is not None and pending[0] == round_index and np.array_equal(pending[1], ids):
      batches = pending[2].result()
    else:
      batches = self._build(round_index, ids)
    if next_round is not None:
      self._pending = (next_round[0], next_round[1], self._pool.submit(self._build, *next_round))
    return batches
