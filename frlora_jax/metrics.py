"""Classification metrics from predictions: accuracy, Matthews correlation, macro-F1."""
from __future__ import annotations

import numpy as np


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
  """[true, predicted] counts."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def accuracy(cm: np.ndarray) -> float:
  return float(np.trace(cm) / max(cm.sum(), 1))


def matthews_corrcoef(cm: np.ndarray) -> float:
  """Multi-class MCC (Gorodkin 2004); equals the binary MCC for two classes. 0 when undefined."""
  cm = cm.astype(np.float64)
  n, correct = cm.sum(), np.trace(cm)
  true_totals, pred_totals = cm.sum(axis=1), cm.sum(axis=0)
  cov_tp = correct * n - true_totals @ pred_totals
  cov_pp = n * n - pred_totals @ pred_totals
  cov_tt = n * n - true_totals @ true_totals
  denom = np.sqrt(cov_pp * cov_tt)
  return float(cov_tp / denom) if denom > 0 else 0.0


def macro_f1(cm: np.ndarray) -> float:
  """Mean over classes that occur (in labels or predictions) of per-class F1."""
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1) + cm.sum(axis=0)
  present = support > 0
  f1 = np.where(present, 2 * tp / np.maximum(support, 1), 0.0)
  return float(f1[present].mean()) if present.any() else 0.0


def classification_metrics(predictions, labels, num_classes: int) -> dict[str, float]:
  cm = confusion_matrix(predictions, labels, num_classes)
  return {"accuracy": accuracy(cm), "mcc": matthews_corrcoef(cm), "macro_f1": macro_f1(cm)}
