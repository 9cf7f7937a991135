"""What a Flower deployment costs per round against the in-process simulation of the same config.

  python benchmarks/flower_overhead.py --config configs/X.py --workdir DIR [--config.a=b]

Runs the config three ways (the simulation; a local SuperLink + SuperNodes with JAX's persistent
compilation cache on the nodes; the same without it), checks the three metrics.jsonl agree, and
prints one JSON line: median seconds per round after the first, the nodes' own timings (setup:
import, data and model; replay; train: compile or cache load, then the steps), and the bytes
each client received and sent per round against the `communication` accounting.
"""
import json
import os
import statistics
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (emptied first).")
flags.mark_flags_as_required(["config", "workdir"])


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _median_after_first(values):
  return round(statistics.median(values[1:]), 3) if len(values) > 1 else None


def main(argv):
  del argv
  import shutil
  from frlora_jax import experiment
  from frlora_jax.flower import local
  config, root = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  shutil.rmtree(root, ignore_errors=True)
  experiment.run(config, os.path.join(root, "simulation"))
  simulated = _records(os.path.join(root, "simulation", "metrics.jsonl"))
  result = {"algorithm": config.fl.algorithm, "clients": config.fl.num_clients, "rounds": config.fl.rounds,
            "simulation_round_s": _median_after_first([r["seconds"] for r in simulated])}
  for name, node_config in [("flower_cached", ""), ("flower_uncached", "compilation-cache=false")]:
    workdir = os.path.join(root, name)
    extra = {k: node_config for k in range(config.fl.num_clients)}
    with local.Deployment(os.path.join(workdir, "flower"), config.fl.num_clients, extra) as nodes:
      local.check_outcome(workdir, nodes.run_app(local.prepare(config, workdir, timeout=1800)))
    records, wire = _records(os.path.join(workdir, "metrics.jsonl")), _records(os.path.join(workdir, "flower.jsonl"))
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(simulated, records))
    node_rounds = [[t for t in r["node_timings"]] for r in wire]
    per_part = {part: _median_after_first([statistics.mean(t.get(part, 0.0) for t in ts) for ts in node_rounds])
                for part in ("setup_seconds", "replay_seconds", "train_seconds", "node_seconds")}
    result[name] = {
        "round_s": _median_after_first([r["seconds"] for r in records]),
        "first_round_s": records[0]["seconds"], "node_median_after_first": per_part,
        "max_train_loss_gap_vs_simulation": gap,
        "download_array_bytes_per_client": wire[-1]["download_array_bytes"][0],
        "download_message_bytes_per_client": wire[-1]["download_message_bytes"][0],
        "upload_array_bytes_per_client": wire[-1]["upload_array_bytes"][0],
        "upload_message_bytes_per_client": wire[-1]["upload_message_bytes"][0],
        "accounted": records[-1]["communication"]}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
