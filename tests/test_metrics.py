"""Metrics against hand-computed values."""
import numpy as np
import pytest

from frlora_jax import metrics


def test_binary_mcc_and_f1_by_hand():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
  preds = np.array([1, 1, 0, 0, 0, 1, 0, 1])
  tp, tn, fp, fn = 3, 3, 1, 1
  mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  m = metrics.classification_metrics(preds, labels, 2)
  assert m["accuracy"] == pytest.approx(6 / 8)
  assert m["mcc"] == pytest.approx(mcc)
  assert m["macro_f1"] == pytest.approx(0.75)


def test_constant_prediction_has_zero_mcc():
  m = metrics.classification_metrics(np.zeros(10, int), np.array([0, 1] * 5), 2)
  assert m["mcc"] == 0.0 and m["accuracy"] == 0.5


def test_multiclass_perfect_and_inverse():
  labels = np.array([0, 1, 2, 0, 1, 2])
  assert metrics.classification_metrics(labels, labels, 3)["mcc"] == pytest.approx(1.0)
  assert metrics.classification_metrics((labels + 1) % 3, labels, 3)["mcc"] < 0
