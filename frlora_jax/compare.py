"""Run several algorithms over several seeds on one config and tabulate them like the paper.

  python -m frlora_jax.compare --config configs/demo.py --algorithms frlora,fedavg,ffa_lora \
      --seeds 0,1,2 --workdir runs/cmp [--config.fl.rounds=10] [--target 0.75]

Each (algorithm, seed) runs in its own workdir (`<workdir>/<algorithm>/seed<k>`), so an
interrupted comparison resumes where it stopped. Writes results.md, results.csv and
curves.png into --workdir.
"""
from __future__ import annotations

import csv
import math
import os
import signal

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from frlora_jax import distributed


def parse_algorithms(text: str) -> list[str]:
  from frlora_jax import algorithms
  names = list(algorithms.names()) if text.strip() == "all" else [a.strip() for a in text.split(",") if a.strip()]
  for name in names:
    if name not in algorithms.names():
      raise ValueError(f"--algorithms: {name!r} is unknown; use names from {', '.join(algorithms.names())} or 'all'.")
  return names


def eval_curve(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
  evals = [r for r in records if "eval" in r]
  return np.array([r["round"] for r in evals]), np.array([r["eval"][metric] for r in evals], np.float64)


def rounds_to_reach(rounds: np.ndarray, values: np.ndarray, target: float) -> float:
  hit = np.flatnonzero(values >= target)
  return float(rounds[hit[0]]) if len(hit) else math.nan


def summarise(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], target: float | None):
  """Rows of mean/std of final and best metric, and rounds to reach the target, per algorithm."""
  if target is None:
    target = 0.95 * max(np.mean([v[-1] for _, v in runs]) for runs in curves.values())
  rows = []
  for name, runs in curves.items():
    final = np.array([v[-1] for _, v in runs])
    best = np.array([v.max() for _, v in runs])
    reach = np.array([rounds_to_reach(r, v, target) for r, v in runs])
    rows.append({
        "algorithm": name, "seeds": len(runs),
        "final_mean": final.mean(), "final_std": final.std(ddof=1) if len(final) > 1 else 0.0,
        "best_mean": best.mean(), "best_std": best.std(ddof=1) if len(best) > 1 else 0.0,
        "rounds_to_target_mean": float(np.nanmean(reach)) if np.isfinite(reach).any() else math.nan,
        "seeds_reaching_target": int(np.isfinite(reach).sum()),
    })
  return rows, target


def privacy_summary(last_records: list[dict]) -> dict:
  """For private runs (every seed's last record logs `privacy`): the largest final epsilon over
  seeds, its delta and each seed's noise multiplier (derived per partition from a target epsilon,
  so it differs by seed). Empty for runs without DP."""
  logged = [r.get("privacy") for r in last_records]
  if not logged or any(p is None for p in logged):
    return {}
  return {"epsilon": max(p["epsilon"] for p in logged), "delta": logged[0]["delta"],
          "noise_multipliers": " ".join(f"{p['noise_multiplier']:.3g}" for p in logged)}


def write_results(rows: list[dict], target: float, metric: str, title: str, folder: str) -> None:
  fields = list(dict.fromkeys(field for r in rows for field in r))
  with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
  private = "epsilon" in fields
  lines = [f"### {title}", "",
           f"| algorithm | seeds | final {metric} | best {metric} | rounds to {metric} >= {target:.3f} |"
           + (" final epsilon (delta) | noise multiplier per seed |" if private else ""),
           "|---|---|---|---|---|" + ("---|---|" if private else "")]
  for r in rows:
    reach = (f"{r['rounds_to_target_mean']:.1f} ({r['seeds_reaching_target']}/{r['seeds']} seeds)"
             if r["seeds_reaching_target"] else f"not reached (0/{r['seeds']})")
    privacy = ""
    if private:
      privacy = (f" {r['epsilon']:.3f} ({r['delta']:g}) | {r['noise_multipliers']} |" if "epsilon" in r
                 else " no DP | |")
    lines.append(f"| {r['algorithm']} | {r['seeds']} | {r['final_mean']:.4f} ± {r['final_std']:.4f} | "
                 f"{r['best_mean']:.4f} ± {r['best_std']:.4f} | {reach} |" + privacy)
  with open(os.path.join(folder, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n\nmean ± sample std over seeds.\n")


def compare(config, algorithm_names: list[str], seeds: list[int], workdir: str, target: float | None = None,
            report_only: bool = False):
  """Run every (algorithm, seed) and write the summary; returns the summary rows.

  report_only: run nothing; tabulate the runs already finished (all `rounds` logged).
  """
  from frlora_jax import experiment, plots, run_log
  curves, last_records = {}, {}
  for name in algorithm_names:
    curves[name], last_records[name] = [], []
    for seed in seeds:
      run_config = config.copy_and_resolve_references()
      run_config.fl.algorithm, run_config.seed = name, seed
      run_dir = os.path.join(workdir, name, f"seed{seed}")
      if not report_only:
        print(f"== {name} seed {seed} -> {run_dir}", flush=True)
        experiment.run(run_config, run_dir)
      if not distributed.is_main():  # process 0 logs and summarises a multi-process comparison
        continue
      records = run_log.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
      if report_only and not any(r["round"] == config.fl.rounds for r in records):
        continue
      curves[name].append(eval_curve(records, config.data.metric))
      last_records[name].append(records[-1])
    if not curves[name]:
      del curves[name]
  if not distributed.is_main():
    return []
  if not curves:
    raise ValueError(f"No finished run under {workdir}; run without --report_only first.")
  rows, target = summarise(curves, target)
  for row in rows:
    row.update(privacy_summary(last_records[row["algorithm"]]))
  title = (f"{config.data.task} | {config.model.name} | {config.fl.num_clients} clients, "
           f"{config.fl.partition}" + (f"({config.fl.dirichlet_beta})" if config.fl.partition == "dirichlet" else "")
           + f", {config.fl.rounds} rounds x {config.fl.local_steps} local steps, seeds {seeds}")
  write_results(rows, target, config.data.metric, title, workdir)
  plots.comparison_curves(curves, config.data.metric, f"{config.data.task}: {config.fl.partition}",
                          os.path.join(workdir, "curves.png"))
  return rows


def cli():
  """The command line (flags are defined here, not at import, so the module is importable)."""
  config = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=False)
  algorithm_names = flags.DEFINE_string("algorithms", "frlora,fedavg,ffa_lora", "Comma-separated names, or 'all'.")
  seeds = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  workdir = flags.DEFINE_string("workdir", None, "Where runs and results go.")
  target = flags.DEFINE_float("target", None, "Eval metric to reach; default 95% of the best mean final value.")
  report_only = flags.DEFINE_bool("report_only", False, "Run nothing; tabulate the finished runs in --workdir.")
  join_processes = distributed.define_flags()

  def main(argv):
    del argv
    # As in train.py: a background job inherits SIGINT as ignored; restore it so kill -INT saves and stops.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.set_verbosity(logging.WARNING)
    import transformers
    transformers.logging.set_verbosity_error()
    if not workdir.value or config.value is None:
      raise app.UsageError("--config and --workdir are required.")
    os.makedirs(workdir.value, exist_ok=True)
    try:
      join_processes()
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    seed_list = [int(s) for s in seeds.value.split(",") if s.strip()]
    try:
      compare(config.value, parse_algorithms(algorithm_names.value), seed_list, workdir.value, target.value,
              report_only.value)
    except Exception as e:  # noqa: BLE001 - as train.py: a multi-process run's failed collective
      distributed.stop_if_lost_process(e)
      raise
    if distributed.is_main():
      print(open(os.path.join(workdir.value, "results.md")).read())

  app.run(main)


if __name__ == "__main__":
  cli()
