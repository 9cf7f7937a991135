"""Estimated device memory of every paper config as written, at the paper's model shapes; one JSON line each.

  python benchmarks/paper_memory.py [configs/metamathqa.py ...]

Llama-2-7B for the NLG configs and roberta-base for the NLU ones, from their published
config.json values (no download). The round's clients are vmapped (`auto` on a GPU),
`fl.clients_per_chunk` at a time, so a round needs the larger of fixed + chunk x per-client bytes and the server step's peak
(frlora_jax.memory_plan.estimate). JAX
on a GPU preallocates 75% of its memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION), so
`fits` is judged against 75% of 40 GB and of 80 GB.
"""
from __future__ import annotations

import json
import os
import sys
import time

NLG = ("metamathqa", "alpaca_gpt4", "fed_aya", "fed_chatbotit", "fed_wildchat")
NLU = ("qnli", "cola", "rte", "twenty_news")
GB = 1e9
USABLE = 0.75  # JAX's default GPU preallocation fraction
A100_40GB = 40 * 2 ** 30


def llama2_7b():
  from transformers import LlamaConfig  # meta-llama/Llama-2-7b-hf config.json
  return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def roberta_base(num_labels: int):
  from transformers import RobertaConfig  # FacebookAI/roberta-base config.json
  return RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                       num_labels=num_labels)


def plan(path: str) -> dict:
  from frlora_jax import config_files, memory_plan, plan as plan_lib
  config = config_files.load(path)
  nlg = config.data.kind == "instruction"
  shape = llama2_7b() if nlg else roberta_base(max(2, int(config.data.get("num_labels", 0) or 2)))
  clients = config.fl.clients_per_round or config.fl.num_clients
  t0 = time.perf_counter()
  e = memory_plan.estimate(config, shape)
  chunk = config.fl.clients_per_chunk
  if chunk == "auto":  # what auto picks on an A100 40 GB: 90% of XLA's bytes_limit (75% of the GPU)
    chunk = plan_lib.fit(e, clients, int(USABLE * A100_40GB), 0.9)["clients_per_chunk"]
  vmapped = max(1, min(clients, chunk or clients))  # clients whose activations coexist
  total = max(e["fixed_bytes"] + vmapped * e["per_client_bytes"], e["server_step_peak_bytes"])
  fit = lambda device: int(max(0, (USABLE * device - e["fixed_bytes"]) // e["per_client_bytes"]))
  return {"config": path, "model_shape": "Llama-2-7B" if nlg else "roberta-base", "clients_per_round": clients,
          "clients_per_chunk": vmapped,
          "batch": f"{config.optim.grad_accum} x {config.optim.batch_size} x {config.data.max_length}",
          "param_dtype": config.model.param_dtype, "remat": config.model.remat,
          "fixed_gb": round(e["fixed_bytes"] / GB, 2), "per_client_gb": round(e["per_client_bytes"] / GB, 2),
          "server_step_gb": round(e["server_step_peak_bytes"] / GB, 2), "round_gb": round(total / GB, 2),
          "fits_40gb": total <= USABLE * 40 * GB,
          "clients_fitting_40gb": fit(40 * GB), "clients_fitting_80gb": fit(80 * GB),
          "estimate_s": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
  paths = sys.argv[1:] or [os.path.join("configs", f"{name}.py") for name in NLG + NLU]
  for path in paths:
    print(json.dumps(plan(path)), flush=True)
