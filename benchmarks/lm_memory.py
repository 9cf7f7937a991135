"""Memory of one round of the causal-LM path for a Llama of a given shape; prints one JSON line.

  python benchmarks/lm_memory.py --hidden 576 --layers 30 --heads 9 --kv_heads 3 --intermediate 1536 \
      --vocab 49152 --tie --seq 256 --bs 4 --steps 4 --rank 16 --param_dtype float32 --remat none --measure

Figures, all for the real code path, from abstract shapes (see frlora_jax/memory_plan.py):
- `estimate`: from the jaxpr (backend-independent): fixed bytes (the run state) and bytes per
  client (batches, trained tree x4, saved activations, recompute working set);
  `estimate_bytes` = the larger of fixed + clients x per client (the client phase) and the
  in-place server step's peak (XLA's plan for it).
- `xla_plan`: XLA's buffer plan on this machine's backend for the compiled client update and the
  in-place server step (skip with --no_xla_plan; minutes at 7B).
With --measure, also runs one real round on random weights and reports the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import round_time  # benchmarks/ (this script's folder): the synthetic LM data


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hidden", type=int, default=576)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--kv_heads", type=int, default=3)
  p.add_argument("--intermediate", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--tie", action="store_true", help="tied input/output embeddings (SmolLM2)")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--bs", type=int, default=4)
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--clients", type=int, default=1)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--targets", default=r"(q|v)_proj$", help="comma-separated LoRA target regexes")
  p.add_argument("--param_dtype", choices=["float32", "bfloat16", "float16"], default="float32")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: param_dtype)")
  p.add_argument("--scan_layers", action="store_true", help="llama: config.model.scan_layers (one lax.scan)")
  p.add_argument("--remat", default="none")
  p.add_argument("--algorithm", default="frlora")
  p.add_argument("--executor", default="vmap", help="vmap (the GPU default) or map")
  p.add_argument("--no_xla_plan", action="store_true", help="skip compiling the XLA plan (slow at 7B)")
  p.add_argument("--measure", action="store_true", help="run one real round on random weights; peak RSS")
  return p.parse_args(argv)


def hf_config(args):
  from transformers import LlamaConfig
  return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                     max_position_embeddings=max(args.seq, 128), tie_word_embeddings=args.tie, rope_theta=10000.0,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)


def benchmark_config(args):
  from frlora_jax import defaults
  c = defaults.get_config()
  c.model.name, c.model.remat = "random:llama", args.remat
  c.model.scan_layers = bool(getattr(args, "scan_layers", False))
  c.model.param_dtype, c.model.dtype = args.param_dtype, args.dtype or args.param_dtype
  c.data.kind, c.data.path, c.data.max_length, c.data.metric = "instruction", "synthetic", args.seq, "perplexity"
  c.data.instruction_field, c.data.response_field = "instruction", "response"  # (synthetic tokens: unused)
  c.fl.algorithm, c.fl.num_clients, c.fl.local_steps = args.algorithm, args.clients, args.steps
  c.fl.rounds, c.fl.executor, c.fl.partition = 1, args.executor, "iid"
  c.lora.rank, c.lora.alpha, c.lora.targets = args.rank, 2.0 * args.rank, tuple(args.targets.split(","))
  c.optim.batch_size, c.optim.grad_accum = args.bs, args.grad_accum
  return c


def measure(args, config) -> dict:
  """Peak RSS of building the experiment and running one round (compile included) on random weights."""
  import jax
  from frlora_jax import causal_lm, experiment, workloads
  model = causal_lm.random_causal_lm("llama", hidden=args.hidden, layers=args.layers, heads=args.heads,
                                     kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                                     max_positions=max(args.seq, 128), tie=args.tie,
                                     dtype=workloads.dtype_of(config.model.dtype))
  rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  exp = experiment.build(config, model=model, data=round_time.synthetic_lm_data(args))
  del model
  state = exp.init_state()
  t0 = time.perf_counter()
  updates = experiment.local_updates(exp, state, 0)
  state = experiment.server_update(exp, state, updates, in_place=True)
  jax.block_until_ready(state)
  return {"round_s_with_compile": round(time.perf_counter() - t0, 2), "rss_after_random_model_bytes": rss_model,
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(args) -> dict:
  from frlora_jax import memory_plan
  config, shape = benchmark_config(args), hf_config(args)
  out = {"shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab",
                                                 "tie")},
         "setting": {k: getattr(args, k) for k in ("seq", "bs", "grad_accum", "steps", "clients", "rank", "targets",
                                                   "param_dtype", "remat", "scan_layers", "algorithm", "executor")},
         "compute_dtype": config.model.dtype}
  t0 = time.perf_counter()
  out["estimate"] = plan = memory_plan.estimate(config, shape)
  out["estimate_bytes"] = max(plan["fixed_bytes"] + args.clients * plan["per_client_bytes"],
                              plan["server_step_peak_bytes"])
  out["estimate_s"] = round(time.perf_counter() - t0, 1)
  if not args.no_xla_plan:
    t0 = time.perf_counter()
    programs = memory_plan.round_programs(config, shape, args.clients)
    out["xla_plan"] = {name: programs[name].__dict__ | {"peak": programs[name].peak}
                       for name in ("client_update", "server_step")}
    out["xla_plan_s"] = round(time.perf_counter() - t0, 1)
  if args.measure:
    out["measured"] = measure(args, config)
  return out


if __name__ == "__main__":
  print(json.dumps(run(parse_args())))
