"""Data pipeline: sources, label maps, seeded eval split, length buckets."""
import json

import numpy as np

from conftest import sentiment_rows, write_csv
from frlora_jax import experiment
from frlora_jax.data import batching


def test_bucket_lengths():
  assert batching.bucket_length(5, 256) == 16
  assert batching.bucket_length(17, 256) == 32
  assert batching.bucket_length(300, 256) == 256
  assert batching.bucket_length(100, 80) == 80


def test_csv_string_labels_and_seeded_eval_split(make_config, tmp_path):
  rows = [{"review": r["text"], "verdict": ["rotten", "fresh"][r["label"]]} for r in sentiment_rows(200)]
  path = write_csv(tmp_path / "reviews.csv", rows)
  config = make_config(**{"data.path": path, "data.text_fields": ("review",), "data.label_field": "verdict",
                          "data.label_names": ("rotten", "fresh"), "data.eval_fraction": 0.25})
  a = experiment.build(config).data
  b = experiment.build(config).data
  n_eval = sum(int(batch["valid"].sum()) for batch in a.eval_batches)
  assert n_eval == 50 and len(a.train["labels"]) == 150
  np.testing.assert_array_equal(a.train["input_ids"], b.train["input_ids"])
  assert a.label_names == ("rotten", "fresh") and a.num_labels == 2
  assert set(np.unique(a.train["labels"])) == {0, 1}


def test_jsonl_with_separate_eval_file_and_text_pairs(make_config, tmp_path):
  rows = sentiment_rows(120)
  for name, part in (("train", rows[:100]), ("eval", rows[100:])):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      for r in part:
        f.write(json.dumps({"premise": r["text"], "hypothesis": "the film", "label": r["label"]}) + "\n")
  config = make_config(**{"data.source": "jsonl", "data.path": str(tmp_path / "train.jsonl"),
                          "data.eval_path": str(tmp_path / "eval.jsonl"), "data.text_fields": ("premise", "hypothesis")})
  data = experiment.build(config).data
  assert len(data.train["labels"]) == 100
  assert sum(int(b["valid"].sum()) for b in data.eval_batches) == 20
  assert (data.train["token_type_ids"].max(axis=1) == 1).all()  # pairs encoded as two segments


def test_eval_batches_have_fixed_rows_and_few_shapes(make_config, tmp_path):
  rows = sentiment_rows(300)
  rows += [{"text": " ".join(["good"] * 25), "label": 1}] * 10
  path = write_csv(tmp_path / "mixed.csv", rows)
  data = experiment.build(make_config(**{"data.path": path, "data.max_length": 64, "eval_batch_size": 8})).data
  shapes = {b["input_ids"].shape for b in data.eval_batches}
  assert all(s[0] == 8 for s in shapes) and len({s[1] for s in shapes}) <= 3
  assert data.train["input_ids"].shape[1] == 32  # longest train example (27 tokens) -> bucket 32, not 64


def test_one_eval_shape_pads_every_batch_to_the_longest_row_rounded_to_16():
  sizes = [3, 5, 20, 40, 7, 2]  # buckets 16 and 64 when each batch of 2 gets its own
  ids = [[1] * n for n in sizes]
  masks = [[0] * (n - 1) + [1] for n in sizes]
  per_bucket = batching.lm_eval_batches(ids, masks, 2, 128, pad_id=0)
  one = batching.lm_eval_batches(ids, masks, 2, 128, pad_id=0, buckets=False)
  assert sorted({b["input_ids"].shape[1] for b in per_bucket}) == [16, 64]
  assert {b["input_ids"].shape for b in one} == {(2, 48)}  # 40 rounded up to 16s, not its bucket 64
  for a, b in zip(per_bucket, one):  # the same rows in the same order, only padded differently
    width = min(a["input_ids"].shape[1], b["input_ids"].shape[1])
    np.testing.assert_array_equal(a["loss_mask"][:, :width], b["loss_mask"][:, :width])
    assert a["loss_mask"][:, width:].sum() == 0 and b["loss_mask"][:, width:].sum() == 0
  prompts = batching.prompt_batches(ids, 2, 128, pad_id=0, buckets=False)
  assert {p["input_ids"].shape for p in prompts} == {(2, 48)}
  assert {b["input_ids"].shape for b in batching.lm_eval_batches(ids, masks, 2, 44, 0, buckets=False)} == {(2, 44)}
  assert sorted(int(r) for p in prompts for r in p["rows"]) == list(range(len(sizes)))
  assert all((p["attention_mask"][:, -1] == 1).all() for p in prompts)  # left-padded: every prompt ends last


def test_disk_source_with_named_splits(make_config, tmp_path):
  import datasets
  rows = sentiment_rows(150)
  splits = datasets.DatasetDict({
      "train": datasets.Dataset.from_list(rows[:120]), "validation": datasets.Dataset.from_list(rows[120:])})
  splits.save_to_disk(str(tmp_path / "ds"))
  data = experiment.build(make_config(**{"data.source": "disk", "data.path": str(tmp_path / "ds")})).data
  assert len(data.train["labels"]) == 120 and sum(int(b["valid"].sum()) for b in data.eval_batches) == 30
  import pytest
  with pytest.raises(ValueError, match="has splits .* not 'dev'"):
    experiment.build(make_config(**{"data.source": "disk", "data.path": str(tmp_path / "ds"), "data.eval_split": "dev"}))
