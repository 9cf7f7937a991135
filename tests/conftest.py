"""Fixtures: a tiny random BERT saved as a real HF model dir, and synthetic text data on disk."""
import csv
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak", "boring"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "cast", "was", "is", "very", "quite", "and", "story"]


def write_tiny_model(folder, arch="bert", num_labels=2, hidden=32, layers=2, heads=2):
  from transformers import BertTokenizerFast
  from frlora_jax import models
  os.makedirs(folder, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  model = models.random_classifier(arch, hidden=hidden, layers=layers, heads=heads, vocab=len(vocab),
                                   num_labels=num_labels, max_positions=130, intermediate=64,
                                   initializer_range=0.3)
  from transformers import FlaxBertForSequenceClassification
  flax_model = FlaxBertForSequenceClassification(model.hf_config, seed=0)
  flax_model.params = model.params
  flax_model.save_pretrained(folder)
  BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
  return folder


def sentiment_rows(n, seed=0, num_labels=2):
  """Sentences whose label is set by their sentiment words, mixed with neutral ones (learnable)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    label = int(rng.integers(num_labels))
    words = list(rng.choice(POSITIVE if label == 1 else NEGATIVE, size=int(rng.integers(2, 5))))
    words += list(rng.choice(NEUTRAL, size=int(rng.integers(2, 6))))
    rows.append({"text": " ".join(rng.permutation(words)), "label": label})
  return rows


def write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  return write_tiny_model(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
  return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(400))


def tiny_config(model_dir, data_path, **overrides):
  """A fast config on the tiny model and a local CSV."""
  import default
  c = default.get_config()
  c.model.name = model_dir
  c.data.source, c.data.path = "csv", data_path
  c.data.text_fields, c.data.label_field = ("text",), "label"
  c.data.max_length = 32
  c.fl.num_clients, c.fl.rounds, c.fl.local_steps = 3, 2, 3
  c.fl.executor = "map"
  c.lora.rank, c.lora.alpha = 4, 8.0
  c.optim.batch_size, c.optim.lr = 8, 5e-3
  c.eval_batch_size = 32
  c.checkpoint_every = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def make_config(tiny_model_dir, sentiment_csv):
  return lambda **kw: tiny_config(tiny_model_dir, sentiment_csv, **kw)
