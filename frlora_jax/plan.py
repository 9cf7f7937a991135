"""Will a config fit a GPU? A memory plan before any weights are downloaded or allocated.

  python -m frlora_jax.plan --config configs/metamathqa.py --device a100-40gb
  python -m frlora_jax.plan --config configs/qnli.py --device_memory 24GB --config.optim.batch_size=32
  python -m frlora_jax.plan --config configs/fed_aya.py --model_config path/to/config.json

Shapes come from the model's config.json alone (a hub id fetches only that file; a local
dir or `--model_config` file needs no network). The numbers are `memory_plan.estimate`:
the run state from shapes and dtypes, per-client activations from the jaxpr of the real
loss (in their own dtypes), and XLA's plan of the in-place server step. Prints a table, then
one JSON line with `clients_per_chunk` (how many clients can be vmapped at once in the
stated memory; 0 when not even one fits), `fixed_bytes`, `per_client_bytes`,
`device_memory_bytes` and the margin kept.
"""
from __future__ import annotations

import json
import re

from absl import app, flags, logging
from ml_collections import config_flags

GIB = 2 ** 30
DEVICES = {"a100-40gb": 40 * GIB, "a100-80gb": 80 * GIB, "h100-80gb": 80 * GIB, "h200-141gb": 141 * 10 ** 9,
           "l4-24gb": 24 * GIB, "rtx4090-24gb": 24 * GIB}
UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20,
         "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_memory(text: str) -> int:
  """'40GB' (10^9), '40GiB' (2^30), '4e10' -> bytes."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
  if not match or match.group(2).upper() not in UNITS:
    raise ValueError(f"--device_memory={text!r} is not a size; write e.g. 40GB, 80GiB or 4e10.")
  return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def device_memory(device: str | None, memory: str | None) -> int:
  if memory:
    return parse_memory(memory)
  if device not in DEVICES:
    raise ValueError(f"--device={device!r} is unknown; use one of {', '.join(DEVICES)} or --device_memory.")
  return DEVICES[device]


def model_config(config, path: str | None):
  """The HF config of config.model.name (or of the config.json at `path`), without weights."""
  from transformers import AutoConfig
  if path:
    return AutoConfig.from_pretrained(path)
  if config.model.name.startswith("random:"):
    raise ValueError("config.model.name is a random model; pass its shape with --model_config path/config.json.")
  from frlora_jax import models
  return AutoConfig.from_pretrained(models.resolve_model_dir(config.model.name))


def fit(estimate: dict, clients: int, memory: int, fraction: float) -> dict:
  """The largest number of clients vmapped at once within fraction x memory, and the margin it keeps."""
  usable = int(fraction * memory)
  fixed, per_client, server = estimate["fixed_bytes"], estimate["per_client_bytes"], estimate["server_step_peak_bytes"]
  chunk = 0 if server > usable else max(0, min(clients, (usable - fixed) // per_client))
  peak = max(fixed + max(chunk, 1) * per_client, server)
  return {"clients_per_chunk": int(chunk), "usable_bytes": usable, "round_peak_bytes": int(peak),
          "margin_bytes": int(usable - peak), "shortfall_bytes": int(max(0, peak - usable)) if chunk == 0 else 0}


def device_limit() -> tuple[int, float, str]:
  """(bytes a run may hold, share of it to fill, what it is) for the default device: XLA's own limit on a
  GPU/TPU (already JAX's preallocated share), physical RAM on CPU."""
  import os
  import jax
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), 0.9, f"{device.device_kind} bytes_limit"
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), 0.75, "host RAM"


def auto_clients_per_chunk(config, hf_config) -> int:
  """fl.clients_per_chunk=auto: the most clients the device holds at once (0 = all of them, no chunking).

  Raises before any data or weights are loaded if not even one client fits, saying by how much.
  Chunking never changes results (client.vmap_body), only how many clients share a compiled batch.
  """
  import sys
  limit, fraction, what = device_limit()
  result = plan(config, hf_config, limit, fraction)
  clients = result["config_clients_per_round"]
  if result["clients_per_chunk"] == 0:
    raise ValueError(
        f"config.fl.clients_per_chunk=auto: not even one client fits: a round needs "
        f"{result['round_peak_bytes'] / 1e9:.2f} GB, {result['shortfall_bytes'] / 1e9:.2f} GB more than the "
        f"{result['usable_bytes'] / 1e9:.2f} GB usable ({fraction:.0%} of {what}). Set config.model.remat=block, "
        f"config.model.param_dtype=bfloat16, a smaller config.optim.batch_size with config.optim.grad_accum, or a "
        f"shorter config.data.max_length (python -m frlora_jax.plan shows the effect of each).")
  chunk = result["clients_per_chunk"]
  print(f"fl.clients_per_chunk=auto: {chunk} of {clients} clients at once ({result['fixed_bytes'] / 1e9:.2f} GB "
        f"fixed + {result['per_client_bytes'] / 1e9:.2f} GB per client within {result['usable_bytes'] / 1e9:.2f} GB, "
        f"{fraction:.0%} of {what})", file=sys.stderr)
  return 0 if chunk >= clients else chunk


def plan(config, hf_config, memory: int, fraction: float = 0.75) -> dict:
  from frlora_jax import config_checks, memory_plan
  config_checks.check(config)
  clients = config.fl.clients_per_round or config.fl.num_clients
  estimate = memory_plan.estimate(config, hf_config)
  return {"config_clients_per_round": clients, "device_memory_bytes": memory, "memory_fraction": fraction,
          **estimate, **fit(estimate, clients, memory, fraction)}


def table(result: dict) -> str:
  gb = lambda key: f"{result[key] / 1e9:10.2f} GB"
  rows = [("base (as stored; FRLoRA targets float32)", "base_bytes"),
          ("run state (base, LoRA, head, optimizer/client states)", "fixed_bytes"),
          ("per client: round batches on the device", "batch_bytes"),
          ("per client: LoRA + head, gradients, AdamW moments", "trained_tree_x4_bytes"),
          ("per client: saved activations", "saved_activation_bytes"),
          ("per client: recompute working set", "recompute_working_set_bytes"),
          ("per client: total", "per_client_bytes"),
          ("server step peak (in place)", "server_step_peak_bytes"),
          ("device memory", "device_memory_bytes"),
          (f"usable ({result['memory_fraction']:.0%}, JAX's preallocation)", "usable_bytes"),
          ("round peak at the chosen chunk", "round_peak_bytes")]
  lines = [f"{name:<56}{gb(key)}" for name, key in rows]
  chunk, clients = result["clients_per_chunk"], result["config_clients_per_round"]
  if chunk:
    lines.append(f"clients_per_chunk: {chunk} of {clients} per round "
                 f"(margin {result['margin_bytes'] / 1e9:.2f} GB)")
  else:
    lines.append(f"does not fit: one client needs {result['shortfall_bytes'] / 1e9:.2f} GB more; try "
                 f"--config.model.remat=block, --config.model.param_dtype=bfloat16, a smaller "
                 f"--config.optim.batch_size with --config.optim.grad_accum, or a shorter --config.data.max_length")
  return "\n".join(lines)


def cli():
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:variant]).", lock_config=False)
  device = flags.DEFINE_string("device", "a100-40gb", f"One of {', '.join(DEVICES)}.")
  memory = flags.DEFINE_string("device_memory", None, "Device memory, e.g. 40GB or 80GiB (overrides --device).")
  fraction = flags.DEFINE_float("memory_fraction", 0.75, "Share of it a run may use (JAX preallocates 75%).")
  hf_path = flags.DEFINE_string("model_config", None, "A config.json (or its dir) giving the model's shape.")

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import transformers
    transformers.logging.set_verbosity_error()
    if config.value is None:
      raise app.UsageError("--config is required.")
    try:
      total = device_memory(device.value, memory.value)
      if not 0 < fraction.value <= 1:
        raise ValueError(f"--memory_fraction={fraction.value} must be in (0, 1].")
      result = plan(config.value, model_config(config.value, hf_path.value), total, fraction.value)
    except (ValueError, OSError) as e:
      raise SystemExit(f"error: {e}") from None
    print(table(result))
    print(json.dumps(result))

  app.run(main)


if __name__ == "__main__":
  cli()
