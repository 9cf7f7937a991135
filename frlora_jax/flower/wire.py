"""Pytrees on the wire: a Flower ArrayRecord keyed by each leaf's path, read back against a template.

Both ends build the same tree structures from the same config (the receiver's template), so
only the leaves travel; a leaf missing or misshapen is an error naming its path. bfloat16
travels as its 16-bit pattern (NumPy has no such dtype of its own).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord


def _key(path) -> str:
  return jax.tree_util.keystr(path)


def _portable(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, order="C")  # (ascontiguousarray would make a scalar 1-D)
  return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def to_record(tree: Any) -> ArrayRecord:
  """The leaves of `tree` (host copies) as an ArrayRecord keyed by their paths."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ArrayRecord({_key(path): Array(_portable(np.asarray(leaf))) for path, leaf in leaves})


def from_record(record: ArrayRecord, template: Any) -> Any:
  """A tree shaped like `template` with the record's leaves (dtypes and shapes checked against it)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, like in paths:
    key = _key(path)
    if key not in record:
      raise ValueError(f"Flower message lacks the leaf {key!r}: server and client built different trees "
                       f"(different frlora_jax versions or configs?).")
    value = record[key].numpy()
    if value.shape != tuple(like.shape):
      raise ValueError(f"Flower message leaf {key!r} has shape {value.shape}, expected {tuple(like.shape)}.")
    if value.dtype != like.dtype:
      if not (value.dtype == np.uint16 and np.dtype(like.dtype).name == "bfloat16"):
        raise ValueError(f"Flower message leaf {key!r} has dtype {value.dtype}, expected {like.dtype}.")
      value = value.view(like.dtype)
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def nbytes(tree: Any) -> int:
  """Bytes of a tree's leaves: what its record carries (before Flower's framing)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))
