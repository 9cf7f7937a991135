"""Partitions: deterministic per seed, every example exactly once, no empty client."""
import numpy as np
import pytest

from frlora_jax.data import partition


def _labels(n=500, classes=4, seed=0):
  return np.random.default_rng(seed).integers(classes, size=n)


@pytest.mark.parametrize("beta", [0.1, 0.5, 5.0])
def test_dirichlet_covers_every_example_once(beta):
  labels = _labels()
  parts = partition.dirichlet(labels, 7, beta, seed=3)
  assert len(parts) == 7 and min(len(p) for p in parts) >= 1
  joined = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))


def test_dirichlet_is_deterministic_per_seed_and_skewed():
  labels = _labels()
  a, b = partition.dirichlet(labels, 5, 0.5, seed=1), partition.dirichlet(labels, 5, 0.5, seed=1)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  c = partition.dirichlet(labels, 5, 0.5, seed=2)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  # label skew: some client's label histogram is far from uniform
  shares = [np.bincount(labels[p], minlength=4) / len(p) for p in a]
  assert max(s.max() for s in shares) > 0.5


def test_iid_is_balanced_and_deterministic():
  parts = partition.iid(103, 5, seed=0)
  assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
  assert all(np.array_equal(x, y) for x, y in zip(parts, partition.iid(103, 5, seed=0)))


def test_natural_partition_by_column():
  groups = ["fr", "en", "fr", "de", "en", "fr"]
  parts, names = partition.natural(groups)
  assert names == ["de", "en", "fr"]
  assert [p.tolist() for p in parts] == [[3], [1, 4], [0, 2, 5]]


def test_pack_pads_and_counts():
  matrix, counts = partition.pack([np.array([4, 7]), np.array([1, 2, 3])])
  assert counts.tolist() == [2, 3] and matrix.shape == (2, 3) and matrix[0, :2].tolist() == [4, 7]
