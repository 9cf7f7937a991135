"""Curves: one run's loss and eval metrics, and algorithm comparisons shaded over seeds."""
from __future__ import annotations

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def run_curves(records: list[dict], path: str) -> None:
  """Training loss and every eval metric of one run against the round."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  trained = [r for r in records if "train_loss" in r]
  evals = [r for r in records if "eval" in r]
  left.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], label="train")
  left.plot([r["round"] for r in evals], [r["eval"]["loss"] for r in evals], label="eval")
  left.set(xlabel="round", ylabel="loss")
  left.legend()
  for name in evals[0]["eval"]:
    if name not in ("loss", "perplexity"):
      right.plot([r["round"] for r in evals], [r["eval"][name] for r in evals], label=name)
  right.set(xlabel="round", ylabel="eval")
  right.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def comparison_curves(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], metric: str, title: str,
                      path: str) -> None:
  """curves: algorithm -> [(rounds, values) per seed]; mean line, shaded min..max over seeds.

  Past 10 algorithms the colours repeat, so the line style changes with them.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.2, 4.4))
  palette = plt.get_cmap("tab10").colors
  for i, (name, runs) in enumerate(curves.items()):
    rounds = runs[0][0]
    values = np.stack([v for _, v in runs])
    color, style = palette[i % len(palette)], ("-", "--", ":")[(i // len(palette)) % 3]
    ax.plot(rounds, values.mean(0), label=name, color=color, linestyle=style)
    if len(runs) > 1:
      ax.fill_between(rounds, values.min(0), values.max(0), color=color, alpha=0.15)
  ax.set(xlabel="round", ylabel=f"eval {metric}", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", ncol=2 if len(curves) > 6 else 1)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
