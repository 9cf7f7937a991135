"""Time steady-state federated rounds of the real frlora_jax code path; print one JSON line.

  python benchmarks/round_time.py --arch bert --hidden 384 --layers 6 --heads 12 --vocab 30522 \
      --seq 128 --bs 16 --clients 5 --steps 10 --rounds 3 --rank 16 --executor auto --dtype float32

A random-init model of the given shape and synthetic tokens go through
experiment.build / run_round exactly as a real run does (FRLoRA, PiSSA init,
dropout on). `mfu` is the achieved FLOP/s of the client steps (XLA's own
count for one local step, times clients x steps, over the median round time)
divided by the FLOP/s of a large dense matmul measured in the same process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", choices=["bert", "roberta", "llama"], default="bert",
                 help="llama: the causal-LM path (response-masked chunked loss; second half of each row is the response)")
  p.add_argument("--hidden", type=int, default=384)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--bs", type=int, default=16)
  p.add_argument("--clients", type=int, default=5)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the first (compiling) one")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--executor", choices=["auto", "vmap", "map", "loop"], default="auto")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--algorithm", default="frlora")
  p.add_argument("--dropout_bits", type=int, choices=[8, 16, 32], default=32,
                 help="random bits per dropout draw (config.model.dropout_bits)")
  p.add_argument("--kv_heads", type=int, default=None, help="llama: key/value heads (default: --heads)")
  p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4x hidden; llama 3x)")
  p.add_argument("--tie", action="store_true", help="llama: tied input/output embeddings")
  p.add_argument("--targets", default=None, help="comma-separated LoRA target regexes (default: the config's)")
  p.add_argument("--remat", default="none", help="config.model.remat")
  p.add_argument("--param_dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="storage dtype of the base (default: --dtype)")
  p.add_argument("--scan_layers", action="store_true", help="llama: config.model.scan_layers (one lax.scan)")
  p.add_argument("--logits_chunk", type=int, default=None, help="llama: config.model.logits_chunk (0: all at once)")
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--loss_on", choices=["response", "all"], default="response",
                 help="llama: loss on the second half of each row (a response), or on every token")
  p.add_argument("--data_config", default=None,
                 help="llama: real instruction data, that of this config (e.g. configs/demo_nlg.py:sarcasm or "
                      "configs/demo_nlg.py, the exams), tokenized by its model's tokenizer; --seq is ignored")
  p.add_argument("--pack", type=int, default=0, help="with --data_config: config.data.pack (0: one example per row)")
  p.add_argument("--shared_prefix", action="store_true",
                 help="with --pack: config.data.shared_prefix (the examples' common prefix once per row)")
  p.add_argument("--export_examples", default=None,
                 help="with --data_config: also write the tokenized training examples as JSON, for "
                      "benchmarks/peft_reference.py --examples")
  return p.parse_args(argv)


def real_lm_data(args, config):
  """The data config's instruction data, built by the project's data layer with `config`'s clients,
  batch and packing (the model stays the random one of the requested shape)."""
  from frlora_jax import config_files
  from frlora_jax import data as data_lib
  from frlora_jax.data import instructions
  from frlora_jax.models import load_tokenizer
  source = config_files.load_spec(args.data_config)
  config.data = source.data
  config.data.pack, config.data.max_generate_examples = args.pack, 1
  config.data.shared_prefix = args.shared_prefix
  config.data.max_eval_examples = 8
  tokenizer = load_tokenizer(source.model.name)
  if args.export_examples:
    train_cols, _ = data_lib.load_instruction_columns(config.data, config.seed)
    encoded = instructions.encode(tokenizer, train_cols, config.data, config.data.max_length)
    with open(args.export_examples, "w") as f:
      json.dump({"input_ids": encoded.input_ids, "loss_mask": encoded.loss_mask,
                 "pad_id": data_lib.pad_token_id(tokenizer), "source": args.data_config}, f)
  return data_lib.build(config, tokenizer)


def trained_response_tokens(exp, round_index: int, clients: int) -> int:
  """Response tokens (loss positions) in one round's client batches."""
  rows = exp.train_batches.rows(round_index, np.arange(clients))
  return int(exp.train_batches.columns["loss_mask"][rows][..., 1:].sum())


def synthetic_lm_data(args, seed=0):
  """Full-length random token rows; the second half of each is the response (the loss's positions)."""
  from frlora_jax.data import FederatedData, partition
  rng = np.random.default_rng(seed)
  n = args.clients * args.bs * args.grad_accum * 4
  ids = rng.integers(3, args.vocab, size=(n, args.seq), dtype=np.int32)
  loss_mask = np.zeros_like(ids)
  loss_mask[:, 0 if getattr(args, "loss_on", "response") == "all" else args.seq // 2:] = 1
  train = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
  return FederatedData(train=train, client_indices=partition.iid(n, args.clients, seed), client_names=[],
                       eval_batches=[], num_labels=0, label_names=(), metric="perplexity")


def synthetic_data(args, seed=0):
  if args.arch == "llama":
    return synthetic_lm_data(args, seed)
  from frlora_jax.data import FederatedData, partition
  rng = np.random.default_rng(seed)
  n = args.clients * args.bs * 8
  ids = rng.integers(5, args.vocab, size=(n, args.seq), dtype=np.int32)
  train = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
           "labels": rng.integers(0, 2, size=n).astype(np.int32)}
  return FederatedData(train=train, client_indices=partition.iid(n, args.clients, seed), client_names=[],
                       eval_batches=[], num_labels=2, label_names=(), metric="accuracy")


def benchmark_config(args):
  from frlora_jax import defaults
  c = defaults.get_config()
  c.model.name, c.model.dtype = f"random:{args.arch}", args.dtype
  c.model.dropout_bits = args.dropout_bits
  c.model.remat, c.model.param_dtype = args.remat, args.param_dtype or args.dtype
  c.model.scan_layers = bool(getattr(args, "scan_layers", False))
  if getattr(args, "logits_chunk", None) is not None:
    c.model.logits_chunk = args.logits_chunk
  c.data.path, c.data.max_length = "synthetic", args.seq
  if args.arch == "llama":
    c.data.kind, c.data.metric = "instruction", "perplexity"
    c.data.instruction_field, c.data.response_field = "instruction", "response"  # (synthetic tokens: unused)
  if args.targets:
    c.lora.targets = tuple(args.targets.split(","))
  elif args.arch == "llama":
    c.lora.targets = (r"(q|v)_proj$",)
  c.optim.grad_accum = args.grad_accum
  c.fl.algorithm, c.fl.num_clients, c.fl.local_steps = args.algorithm, args.clients, args.steps
  c.fl.rounds, c.fl.executor, c.fl.partition = args.rounds + 1, args.executor, "iid"
  c.lora.rank, c.lora.alpha = args.rank, 2.0 * args.rank
  c.optim.batch_size = args.bs
  return c


def matmul_flops_per_s(dtype, n=4096, repeats=5) -> float:
  """Sustained FLOP/s of one large dense matmul on the default device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = min(_timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
  return 2.0 * n ** 3 / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def step_flops(exp, state) -> float:
  """XLA's FLOP count for one client's single local step (forward, backward, AdamW)."""
  from frlora_jax import client, experiment
  # XLA's cost analysis counts a while loop's body once: count the layers unrolled.
  unrolled = dataclasses.replace(exp.model, scan_layers=False)
  one_step = experiment.make_local_update(exp.config, exp.algorithm, unrolled, local_steps=1)
  start = exp.algorithm.client_start(state.server, None)
  batches = jax.tree_util.tree_map(lambda x: x[0, :1], exp.train_batches.for_round(0, np.arange(1)))
  inputs = client.ClientInput(start=start, rng=jax.random.PRNGKey(0), step0=jnp.int32(0), total_steps=jnp.int32(10),
                              batches=batches)
  shared = {"base": state.server.base}
  compiled = jax.jit(one_step).lower(shared, inputs).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def run(args) -> dict:
  from frlora_jax import client, compile_count, experiment, models, workloads
  dtype = workloads.dtype_of(args.dtype)
  if args.arch == "llama":
    from frlora_jax import causal_lm
    model = causal_lm.random_causal_lm("llama", hidden=args.hidden, layers=args.layers, heads=args.heads,
                                       kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                                       max_positions=max(args.seq, args.pack, 512), tie=args.tie, dtype=dtype)
  else:
    model = models.random_classifier(args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                     vocab=args.vocab, num_labels=2, max_positions=args.seq + 2,
                                     intermediate=args.intermediate, dtype=dtype)
  config = benchmark_config(args)
  data = real_lm_data(args, config) if args.data_config else synthetic_data(args)
  exp = experiment.build(config, model=model, data=data)
  seq = int(exp.train_batches.columns["input_ids"].shape[-1])
  response_tokens = [trained_response_tokens(exp, r, args.clients) for r in range(1, args.rounds + 1)] \
      if args.arch == "llama" else []
  state = exp.init_state()
  t0 = time.perf_counter()
  state, _ = experiment.run_round(exp, state, 0)
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  times = []
  with compile_count.counting() as compiles:
    for r in range(1, args.rounds + 1):
      t0 = time.perf_counter()
      state, _ = experiment.run_round(exp, state, r)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
  round_s = float(np.median(times))
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FLOP/matmul probes
  flops = step_flops(exp, state) * args.clients * args.steps
  peak = matmul_flops_per_s(dtype)
  device = jax.devices()[0]
  return {
      "arch": args.arch, "hidden": args.hidden, "layers": args.layers, "seq": seq, "bs": args.bs,
      "clients": args.clients, "steps": args.steps, "rank": args.rank, "dtype": args.dtype,
      "param_dtype": args.param_dtype or args.dtype, "remat": args.remat, "scan_layers": args.scan_layers,
      "logits_chunk": exp.config.model.logits_chunk if args.arch == "llama" else None,
      "grad_accum": args.grad_accum,
      "loss_on": args.loss_on if args.arch == "llama" else None, "dropout_bits": args.dropout_bits,
      "executor": client.resolve_executor(args.executor), "algorithm": args.algorithm,
      "device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
      "round_s_median": round(round_s, 4), "round_s_all": [round(t, 4) for t in times],
      "compile_s": round(first - round_s, 3), "compiles_after_first_round": compiles(),
      "client_steps_per_s": round(args.clients * args.steps / round_s, 3),
      "tokens_per_s": round(args.clients * args.steps * args.grad_accum * args.bs * seq / round_s, 1),
      "response_tokens_per_s": round(float(np.mean(response_tokens)) / round_s, 2) if response_tokens else None,
      "data_config": args.data_config, "pack": args.pack, "shared_prefix": args.shared_prefix, "row_length": seq,
      "round_gflop": round(flops / 1e9, 2), "achieved_gflop_per_s": round(flops / round_s / 1e9, 2),
      "matmul_gflop_per_s": round(peak / 1e9, 2), "mfu": round(flops / round_s / peak, 3),
      "peak_rss_mb": round(peak_rss_mb, 1),
  }


if __name__ == "__main__":
  print(json.dumps(run(parse_args())))
