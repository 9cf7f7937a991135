"""The comparison runner: algorithms x seeds -> results.md, results.csv, curves.png."""
import csv
import json

import numpy as np
import pytest

from frlora_jax import compare, run_log


def test_compare_tables_every_algorithm_and_seed(make_config, tmp_path):
  config = make_config(**{"fl.rounds": 2})
  rows = compare.compare(config, ["frlora", "fedavg"], [0, 1], str(tmp_path))
  assert [r["algorithm"] for r in rows] == ["frlora", "fedavg"]
  for row in rows:
    finals = [run_log.read_metrics(str(tmp_path / row["algorithm"] / f"seed{s}" / "metrics.jsonl"))[-1]["eval"]["accuracy"]
              for s in (0, 1)]
    assert row["final_mean"] == pytest.approx(np.mean(finals))
    assert row["final_std"] == pytest.approx(np.std(finals, ddof=1))
    assert row["best_mean"] >= row["final_mean"]
  table = (tmp_path / "results.md").read_text()
  assert "| frlora |" in table and "| fedavg |" in table
  assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == 2
  assert (tmp_path / "curves.png").stat().st_size > 1000
  # --report_only tabulates finished runs without running anything (seed 2 was never run).
  again = compare.compare(config, ["frlora", "fedavg", "scaffold"], [0, 1, 2], str(tmp_path), report_only=True)
  assert [(r["algorithm"], r["seeds"]) for r in again] == [("frlora", 2), ("fedavg", 2)]
  assert again[0]["final_mean"] == rows[0]["final_mean"]
  assert not (tmp_path / "scaffold").exists()


def test_rounds_to_reach_and_algorithm_names():
  assert compare.rounds_to_reach(np.array([1, 2, 3]), np.array([0.5, 0.7, 0.9]), 0.7) == 2.0
  assert np.isnan(compare.rounds_to_reach(np.array([1, 2]), np.array([0.1, 0.2]), 0.7))
  assert "fedreg" in compare.parse_algorithms("all") and len(compare.parse_algorithms("all")) == 17
  with pytest.raises(ValueError, match="--algorithms: 'fedfoo' is unknown"):
    compare.parse_algorithms("frlora,fedfoo")


def test_private_runs_are_tabulated_with_their_epsilon_and_noise(make_config, tmp_path):
  """Runs that log `privacy` get the largest final epsilon over seeds and each seed's noise multiplier."""
  config = make_config(**{"fl.rounds": 2})
  sigmas = {0: 1.0682, 1: 6.3768}
  for seed, sigma in sigmas.items():
    folder = tmp_path / "fedavg" / f"seed{seed}"
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
      for round_index in (1, 2):
        privacy = {"mode": "sample", "epsilon": 3.9 + round_index * (0.04 + seed * 0.01), "delta": 1e-5,
                   "noise_multiplier": sigma}
        f.write(json.dumps({"round": round_index, "eval": {"accuracy": 0.5 + 0.1 * round_index},
                            "privacy": privacy}) + "\n")
  rows = compare.compare(config, ["fedavg"], [0, 1], str(tmp_path), report_only=True)
  assert rows[0]["epsilon"] == pytest.approx(4.0) and rows[0]["delta"] == 1e-5
  assert rows[0]["noise_multipliers"] == "1.07 6.38"
  table = (tmp_path / "results.md").read_text()
  assert "| final epsilon (delta) | noise multiplier per seed |" in table
  assert "| 4.000 (1e-05) | 1.07 6.38 |" in table
  assert next(csv.DictReader(open(tmp_path / "results.csv")))["noise_multipliers"] == "1.07 6.38"
  assert compare.privacy_summary([{"round": 2}]) == {}
