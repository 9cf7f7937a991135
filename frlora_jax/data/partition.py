"""Split a training set among clients: iid, Dirichlet label skew, or a natural column."""
from __future__ import annotations

import collections

import numpy as np

PARTITIONS = ("iid", "dirichlet", "natural")


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """A seeded shuffle cut into near-equal parts."""
  _check_counts(num_examples, num_clients)
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels, num_clients: int, beta: float, seed: int, min_size: int = 1,
              max_tries: int = 1000) -> list[np.ndarray]:
  """Label skew (Hsu et al. 2019): each class is split by proportions ~ Dir(beta).

  Draws again (same seeded stream) until every client holds >= min_size examples.
  """
  labels = np.asarray(labels)
  _check_counts(len(labels), num_clients)
  if beta <= 0:
    raise ValueError(f"config.fl.dirichlet_beta={beta} must be > 0 (smaller is more skewed; the paper uses 0.5).")
  min_size = min(min_size, len(labels) // num_clients)
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, beta)))[:-1] * len(members)).astype(int)
      for k, chunk in enumerate(np.split(members, cuts)):
        parts[k].extend(chunk.tolist())
    if min(len(p) for p in parts) >= max(min_size, 1):
      return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
  raise ValueError(f"Could not give each of config.fl.num_clients={num_clients} clients an example in "
                   f"{max_tries} Dirichlet(beta={beta}) draws; use fewer clients or a larger beta.")


def natural(groups, num_clients: int = 0, largest: int = 0) -> tuple[list[np.ndarray], list]:
  """One client per distinct value of a column (language, user id), in sorted order.

  largest > 0 keeps only the `largest` groups with the most examples (ties by name),
  as FedLLM-Bench does when it keeps the most active users; the rest is dropped.
  """
  rows_of = collections.defaultdict(list)  # one pass: user-id columns can hold 10^5 groups
  for row, group in enumerate(np.asarray(groups, dtype=object).tolist()):
    rows_of[group].append(row)
  keys = sorted(rows_of, key=str)
  if largest:
    keys = sorted(sorted(keys, key=lambda k: (-len(rows_of[k]), str(k)))[:largest], key=str)
  if num_clients and num_clients != len(keys):
    raise ValueError(f"config.fl.num_clients={num_clients} but the natural partition has {len(keys)} groups; "
                     f"set config.fl.num_clients={len(keys)} (or 0 to take the data's count).")
  return [np.asarray(rows_of[k], np.intp) for k in keys], keys


def _check_counts(num_examples: int, num_clients: int) -> None:
  if num_clients < 1:
    raise ValueError(f"config.fl.num_clients={num_clients} must be >= 1.")
  if num_clients > num_examples:
    raise ValueError(f"config.fl.num_clients={num_clients} exceeds the {num_examples} training examples; "
                     f"use fewer clients or more data.")


def pack(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Client index lists as one [K, max_n] int32 matrix (padded with 0) and counts [K]."""
  counts = np.array([len(p) for p in parts], np.int32)
  matrix = np.zeros((len(parts), max(counts.max(), 1)), np.int32)
  for k, p in enumerate(parts):
    matrix[k, :len(p)] = p
  return matrix, counts
