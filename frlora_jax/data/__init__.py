"""config.data + config.fl -> federated, tokenized, fixed-shape data.

The flow: source columns -> checked fields and labels -> train/eval split ->
client partition -> token arrays. Every user-caused problem is raised here,
before any model is loaded or compiled.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from frlora_jax.data import batching, instructions, partition, sources, tasks
from frlora_jax.data.partition import PARTITIONS
from frlora_jax.data.sources import SOURCES
from frlora_jax.data.tasks import METRICS, TASKS, apply_task


@dataclasses.dataclass
class Examples:
  texts: list[list]     # one list per text field
  labels: np.ndarray    # int labels
  columns: dict         # all raw columns (for natural partitions)


@dataclasses.dataclass
class FederatedData:
  train: dict[str, np.ndarray]       # token arrays [N, L] and labels [N]
  client_indices: list[np.ndarray]   # rows of `train` per client
  client_names: list
  eval_batches: list[dict]
  num_labels: int
  label_names: tuple
  metric: str
  prompt_batches: list[dict] = dataclasses.field(default_factory=list)  # generation: left-padded prompts
  references: list[str] = dataclasses.field(default_factory=list)       # generation: reference answers


def _check_fields(columns: dict, d, where: str) -> None:
  for field in tuple(d.text_fields) + (d.label_field,):
    if field not in columns:
      which = "config.data.label_field" if field == d.label_field else "config.data.text_fields"
      raise ValueError(f"{which}: column {field!r} is not in {where} (it has {sorted(columns)}); "
                       f"set {which} to one of those.")


def _encode_labels(raw: list, d, label_names: tuple, num_labels: int, where: str) -> np.ndarray:
  if label_names:
    index = {str(name): i for i, name in enumerate(label_names)}
    bad = sorted({str(v) for v in raw if str(v) not in index and not _is_int(v)})
    if bad:
      raise ValueError(f"{where}: labels {bad[:5]} in column {d.label_field!r} are not in config.data.label_names="
                       f"{tuple(label_names)}; add them there or drop those rows.")
    ids = np.array([index[str(v)] if str(v) in index else int(v) for v in raw], np.int64)
  else:
    if not all(_is_int(v) for v in raw):
      raise ValueError(f"{where}: column {d.label_field!r} holds non-integer labels; "
                       f"list them in config.data.label_names to map them to classes.")
    ids = np.array([int(v) for v in raw], np.int64)
  if len(ids) and (ids.min() < 0 or ids.max() >= num_labels):
    raise ValueError(f"{where}: labels in column {d.label_field!r} span [{ids.min()}, {ids.max()}], outside the "
                     f"task's range [0, {num_labels - 1}]; fix config.data.num_labels or the data.")
  return ids


def _is_int(v) -> bool:
  try:
    return float(v) == int(float(v))
  except (TypeError, ValueError):
    return False


def _drop_rows(columns: dict, d) -> dict:
  if not d.drop_labels:
    return columns
  keep = [i for i, v in enumerate(columns[d.label_field]) if str(v) not in set(map(str, d.drop_labels))]
  return {k: [vals[i] for i in keep] for k, vals in columns.items()}


def _take(columns: dict, rows) -> dict:
  return {k: [vals[i] for i in rows] for k, vals in columns.items()}


def _subsample(columns: dict, limit: int, seed: int) -> dict:
  n = len(next(iter(columns.values())))
  if not limit or limit >= n:
    return columns
  return _take(columns, np.sort(np.random.default_rng(seed).permutation(n)[:limit]))


def load_splits(d, seed: int, prepare=lambda columns: columns) -> tuple[dict, dict]:
  """Raw (train, eval) columns: a named eval split, a separate eval file, or a seeded fraction.

  `prepare` runs on the training columns before a fraction is held out of them.
  """
  train = sources.load(d.source, d.path, name=d.name, split=d.train_split)
  if d.eval_path:
    return train, sources.load(d.source, d.eval_path, name=d.name, split=d.eval_split or "validation")
  if d.source in ("hub", "disk") and d.eval_split:
    return train, sources.load(d.source, d.path, name=d.name, split=d.eval_split)
  if not 0.0 < d.eval_fraction < 1.0:
    raise ValueError(f"config.data.eval_fraction={d.eval_fraction} must be in (0, 1) when no eval file is given.")
  train = prepare(train)
  n = len(next(iter(train.values())))
  order = np.random.default_rng(seed + 7919).permutation(n)
  n_eval = max(1, int(round(d.eval_fraction * n)))
  return _take(train, np.sort(order[n_eval:])), _take(train, np.sort(order[:n_eval]))


def _checked_and_dropped(d):
  def prepare(columns):
    _check_fields(columns, d, d.path)
    return _drop_rows(columns, d)
  return prepare


def load_examples(d, seed: int) -> tuple[Examples, Examples, tuple, int]:
  """Checked train/eval examples, label names and number of labels."""
  train_cols, eval_cols = load_splits(d, seed, _checked_and_dropped(d))
  for cols, where in ((train_cols, f"{d.path} (train)"), (eval_cols, f"{d.path} (eval)")):
    _check_fields(cols, d, where)
  train_cols, eval_cols = _drop_rows(train_cols, d), _drop_rows(eval_cols, d)
  if not len(train_cols[d.label_field]):
    raise ValueError(f"config.data.path={d.path!r} has no training examples left; check the file and "
                     f"config.data.drop_labels.")
  train_cols = _subsample(train_cols, d.max_train_examples, seed)
  eval_cols = _subsample(eval_cols, d.max_eval_examples, seed + 1)
  label_names = tuple(d.label_names)
  if not label_names and not all(_is_int(v) for v in train_cols[d.label_field]):
    label_names = tuple(sorted({str(v) for v in train_cols[d.label_field]}))
  num_labels = d.num_labels or len(label_names) or int(max(int(float(v)) for v in train_cols[d.label_field])) + 1
  out = []
  for cols, where in ((train_cols, f"{d.path} (train)"), (eval_cols, f"{d.path} (eval)")):
    labels = _encode_labels(cols[d.label_field], d, label_names, num_labels, where)
    out.append(Examples([cols[f] for f in d.text_fields], labels, cols))
  return out[0], out[1], label_names, num_labels


def partition_clients(train: Examples, fl, seed: int) -> tuple[list[np.ndarray], list]:
  if fl.partition == "iid":
    parts = partition.iid(len(train.labels), fl.num_clients, seed)
  elif fl.partition == "dirichlet":
    parts = partition.dirichlet(train.labels, fl.num_clients, fl.dirichlet_beta, seed)
  elif fl.partition == "natural":
    if fl.natural_field not in train.columns:
      raise ValueError(f"config.fl.natural_field={fl.natural_field!r} is not a column of the training data "
                       f"(it has {sorted(train.columns)}).")
    return partition.natural(train.columns[fl.natural_field], fl.num_clients, fl.natural_largest)
  else:
    raise ValueError(f"config.fl.partition={fl.partition!r} is unknown; use one of {PARTITIONS}.")
  return parts, list(range(len(parts)))


def build(config, tokenizer) -> FederatedData:
  if config.data.kind == "instruction":
    return build_instructions(config, tokenizer)
  return build_classification(config, tokenizer)


def pad_token_id(tokenizer) -> int:
  """The tokenizer's pad id, else its EOS (causal LMs often have no pad token), else 0."""
  for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if value is not None:
      return int(value)
  return 0


def load_instruction_columns(d, seed: int) -> tuple[dict, dict]:
  """Raw train/eval columns of an instruction dataset, with the configured fields checked."""
  needed = [f for f in (d.messages_field, d.instruction_field, d.input_field, d.response_field, d.reference_field) if f]
  train, eval_ = load_splits(d, seed)
  for cols, where in ((train, f"{d.path} (train)"), (eval_, f"{d.path} (eval)")):
    missing = [f for f in needed if f not in cols]
    if missing:
      raise ValueError(f"config.data: column(s) {missing} are not in {where} (it has {sorted(cols)}); set the "
                       f"config.data.*_field settings to those columns.")
  return _subsample(train, d.max_train_examples, seed), _subsample(eval_, d.max_eval_examples, seed + 1)


def build_instructions(config, tokenizer) -> FederatedData:
  """Instruction data: response-masked token arrays, eval-loss batches and generation prompts."""
  d, fl = config.data, config.fl
  train_cols, eval_cols = load_instruction_columns(d, config.seed)
  pad_id = pad_token_id(tokenizer)
  train = instructions.encode(tokenizer, train_cols, d, d.max_length)
  eval_ = instructions.encode(tokenizer, eval_cols, d, d.max_length)
  for enc, cols, where in ((train, train_cols, "training"), (eval_, eval_cols, "eval")):
    if not len(enc.kept):
      raise ValueError(f"No {where} record fits config.data.max_length={d.max_length} tokens (all "
                       f"{len(next(iter(cols.values())))} are longer); raise config.data.max_length.")
  train_cols = _take(train_cols, train.kept)
  parts, names = partition_clients(Examples([], np.zeros(len(train.kept)), train_cols), fl, config.seed)
  if d.pack:
    prefix = batching.shared_prefix_length(train.input_ids, train.loss_mask) if d.shared_prefix else 0
    train_arrays, parts = _packed_train(train, parts, d.pack, pad_id, config.seed, prefix)
  else:
    length = batching.bucket_length(max(len(s) for s in train.input_ids), d.max_length)
    train_arrays = batching.lm_arrays(train.input_ids, train.loss_mask, length, pad_id)
  train_arrays.update(batching.response_positions(train_arrays["loss_mask"]))
  generate_rows = np.arange(len(eval_.prompts))[:d.max_generate_examples or None]
  prompts = [eval_.prompts[i] for i in generate_rows]
  return FederatedData(
      train=train_arrays, client_indices=parts, client_names=names,
      eval_batches=batching.lm_eval_batches(eval_.input_ids, eval_.loss_mask, config.eval_batch_size, d.max_length,
                                            pad_id, d.eval_buckets),
      num_labels=0, label_names=(), metric=d.metric,
      prompt_batches=batching.prompt_batches(prompts, config.eval_batch_size, d.max_length, pad_id, d.eval_buckets)
      if d.answer_format != "none" else [],
      references=[eval_.references[i] for i in generate_rows])


def _packed_train(train, parts, length: int, pad_id: int, seed: int, prefix: int = 0):
  """Each client's examples, in a seeded order, packed into rows of `length` tokens (data.pack), each row
  starting with the `prefix` tokens all examples share (data.shared_prefix; 0: none): (packed train arrays,
  each client's packed row indices). A row never mixes clients."""
  sizes = np.array([len(s) for s in train.input_ids]) - prefix
  rows, client_rows = [], []
  for k, examples in enumerate(parts):
    order = np.random.default_rng([seed, k]).permutation(np.asarray(examples))
    packed = batching.pack_examples(sizes, order, length - prefix)
    client_rows.append(np.arange(len(rows), len(rows) + len(packed)))
    rows.extend(packed)
  if prefix:
    logging.info("data.shared_prefix: the %d tokens every training example starts with are laid once per packed "
                 "row (%d rows, %.1f examples each).", prefix, len(rows), len(train.input_ids) / max(1, len(rows)))
  return batching.packed_lm_arrays(train.input_ids, train.loss_mask, rows, length, pad_id, prefix), client_rows


def build_classification(config, tokenizer) -> FederatedData:
  d, fl = config.data, config.fl
  train, eval_, label_names, num_labels = load_examples(d, config.seed)
  parts, names = partition_clients(train, fl, config.seed)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  train_encoded = batching.tokenize(tokenizer, train.texts, d.max_length)
  eval_encoded = batching.tokenize(tokenizer, eval_.texts, d.max_length)
  return FederatedData(
      train=batching.train_arrays(train_encoded, train.labels, d.max_length, pad_id),
      client_indices=parts, client_names=names,
      eval_batches=batching.eval_batches(eval_encoded, eval_.labels, config.eval_batch_size, d.max_length, pad_id,
                                         d.eval_buckets),
      num_labels=num_labels, label_names=label_names, metric=d.metric)
