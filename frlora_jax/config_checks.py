"""Checks of a config that need no data or model: they run before any work is done."""
from __future__ import annotations

from frlora_jax import algorithms, client, dropout, privacy, ranks, remat, weights
from frlora_jax.algorithms.fedopt import SERVER_RULES
from frlora_jax.optim import SCHEDULES
from frlora_jax.data import METRICS, PARTITIONS, SOURCES, TASKS, instructions
from frlora_jax.data.tasks import LM_METRICS

LORA_INITS = ("auto", "kaiming", "pissa")
WEIGHTINGS = ("data_size", "uniform")
SCHEDULE_STEPS = ("local", "loader")
DTYPES = tuple(weights.DTYPES)


def _one_of(value, choices, field: str) -> None:
  if value not in choices:
    raise ValueError(f"{field}={value!r} is unknown; use one of {', '.join(map(str, choices))}.")


def _positive(value, field: str, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{field}={value} must be {'>= 0' if allow_zero else '> 0'}.")


def check(config) -> None:
  """Raise ValueError naming the field and the fix for any bad setting."""
  fl, data, lora, optim = config.fl, config.data, config.lora, config.optim
  _one_of(fl.executor, client.EXECUTORS, "config.fl.executor")
  _one_of(fl.partition, PARTITIONS, "config.fl.partition")
  _one_of(fl.weighting, WEIGHTINGS, "config.fl.weighting")
  _one_of(fl.schedule_steps, SCHEDULE_STEPS, "config.fl.schedule_steps")
  _one_of(fl.shard_clients, ("auto", "on", "off"), "config.fl.shard_clients")
  _one_of(fl.server_rule, SERVER_RULES, "config.fl.server_rule")
  _one_of(data.source, SOURCES, "config.data.source")
  _one_of(data.metric, METRICS, "config.data.metric")
  _one_of(lora.init, LORA_INITS, "config.lora.init")
  _one_of(config.model.dtype, DTYPES, "config.model.dtype")
  _one_of(config.model.param_dtype, DTYPES, "config.model.param_dtype")
  _one_of(config.model.dropout_bits, dropout.BITS, "config.model.dropout_bits")
  remat.check(config.model.remat)
  if config.model.scan_layers and data.kind != "instruction":
    raise ValueError("config.model.scan_layers=True scans causal Llama layers; this is a classification run "
                     "(config.data.kind='classification'): set config.model.scan_layers=False.")
  _one_of(data.kind, ("classification", "instruction"), "config.data.kind")
  if data.kind == "instruction":
    check_instruction(config)
  if data.task != "custom":
    _one_of(data.task, tuple(TASKS) + ("custom",), "config.data.task")
  if fl.partition == "dirichlet" and fl.dirichlet_beta <= 0:
    raise ValueError(f"config.fl.dirichlet_beta={fl.dirichlet_beta} must be > 0 "
                     f"(smaller is more skewed; the paper uses 0.5).")
  if fl.partition == "natural" and not fl.natural_field:
    raise ValueError("config.fl.natural_field is empty; name the column whose values define the clients.")
  if fl.partition != "natural":
    _positive(fl.num_clients, "config.fl.num_clients")
  _positive(fl.rounds, "config.fl.rounds")
  _positive(fl.local_steps, "config.fl.local_steps")
  _positive(fl.clients_per_round, "config.fl.clients_per_round", allow_zero=True)
  if fl.partition != "natural" and fl.clients_per_round > fl.num_clients:
    raise ValueError(f"config.fl.clients_per_round={fl.clients_per_round} exceeds config.fl.num_clients="
                     f"{fl.num_clients}; lower it (0 means all clients).")
  if fl.clients_per_chunk != "auto":
    if isinstance(fl.clients_per_chunk, bool) or not isinstance(fl.clients_per_chunk, int):
      raise ValueError(f"config.fl.clients_per_chunk={fl.clients_per_chunk!r} must be 'auto' or a whole number "
                       f"(0: all clients at once).")
    _positive(fl.clients_per_chunk, "config.fl.clients_per_chunk", allow_zero=True)
  _positive(lora.rank, "config.lora.rank")
  _positive(lora.alpha, "config.lora.alpha")
  if not 0.0 <= lora.dropout < 1.0:
    raise ValueError(f"config.lora.dropout={lora.dropout} must be in [0, 1).")
  if not lora.targets:
    raise ValueError("config.lora.targets is empty; give regexes of module paths, e.g. ('query', 'value').")
  _positive(optim.lr, "config.optim.lr")
  _one_of(optim.schedule, SCHEDULES, "config.optim.schedule")
  _positive(optim.batch_size, "config.optim.batch_size")
  _positive(optim.grad_accum, "config.optim.grad_accum")
  _positive(config.model.logits_chunk, "config.model.logits_chunk", allow_zero=True)
  _positive(data.max_length, "config.data.max_length")
  _positive(config.eval_every, "config.eval_every")
  _positive(config.eval_batch_size, "config.eval_batch_size")
  if not data.path:
    raise ValueError("config.data.path is empty; point it at a dataset (hub id, folder, CSV/JSONL file) "
                     "or pick a task with config.data.task.")
  if data.kind == "classification" and (not data.text_fields or len(data.text_fields) > 2):
    raise ValueError(f"config.data.text_fields={tuple(data.text_fields)} must name one or two columns.")
  # The algorithm's own checks (its hyperparameters, LoRA settings it fixes), before any data is read.
  algorithm = algorithms.from_config(config)
  algorithms.lora_settings(algorithm, lora)
  ranks.check_algorithm(fl.client_ranks, algorithm)
  privacy.check(config, algorithm)
  if fl.partition != "natural":  # natural partitions know their client count only once the data is read
    ranks.parse(fl.client_ranks, fl.num_clients, lora.rank)


def check_instruction(config) -> None:
  data, fl = config.data, config.fl
  _one_of(data.template, instructions.TEMPLATES, "config.data.template")
  _one_of(data.answer_format, instructions.ANSWER_FORMATS, "config.data.answer_format")
  if data.metric not in LM_METRICS:
    raise ValueError(f"config.data.metric={data.metric!r} is a classification metric; instruction data reports "
                     f"{' or '.join(LM_METRICS)}.")
  if data.metric == "exact_match" and data.answer_format == "none":
    raise ValueError("config.data.metric='exact_match' needs config.data.answer_format 'letter', 'number' or 'word'.")
  if not data.messages_field and not (data.instruction_field and data.response_field):
    raise ValueError("config.data: instruction data needs config.data.messages_field, or "
                     "config.data.instruction_field and config.data.response_field.")
  if fl.partition == "dirichlet":
    raise ValueError("config.fl.partition='dirichlet' needs class labels; instruction data uses 'iid' or 'natural'.")
  _positive(data.max_new_tokens, "config.data.max_new_tokens")
  if not isinstance(data.prompt_max_tokens, int) or data.prompt_max_tokens < 0:
    raise ValueError(f"config.data.prompt_max_tokens={data.prompt_max_tokens!r} must be 0 (whole user turns) or "
                     f"a token count to cut each user turn to.")
  if not isinstance(data.pack, int) or data.pack < 0:
    raise ValueError(f"config.data.pack={data.pack!r} must be 0 (off) or a row length in tokens.")
  if data.pack and data.pack < data.max_length:
    raise ValueError(f"config.data.pack={data.pack} is shorter than config.data.max_length={data.max_length}, so "
                     f"the longest kept example would not fit a packed row; set pack >= max_length.")
  if data.shared_prefix and not data.pack:
    raise ValueError("config.data.shared_prefix=True lays the shared prefix once per packed row; it needs "
                     "config.data.pack (e.g. 256). Set config.data.pack or config.data.shared_prefix=False.")
  if data.pack and config.dp.mode == "sample":
    raise ValueError("config.data.pack: sample-level DP (config.dp.mode='sample') clips per row and accounts per "
                     "example, but a packed row holds several examples; set config.data.pack=0 for DP-SGD.")
