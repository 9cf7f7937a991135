"""The Flower app (frlora_jax.flower): the same runs as the in-process simulation, over the wire.

The protocol tests call the nodes' handler in this process (no Flower processes); the deployment
tests start a real SuperLink and SuperNodes on 127.0.0.1 and stop every process they started.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config_file
from frlora_jax import experiment
from frlora_jax.flower import client_app, local, server_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _assert_same_run(simulated, flower, tolerance=1e-6):
  a, b = _records(os.path.join(simulated, "metrics.jsonl")), _records(os.path.join(flower, "metrics.jsonl"))
  assert [r["round"] for r in a] == [r["round"] for r in b] and [r["clients"] for r in a] == [r["clients"] for r in b]
  for x, y in zip(a, b):
    np.testing.assert_allclose(x["client_losses"], y["client_losses"], atol=tolerance)
    assert set(x["eval"]) == set(y["eval"])
    for name in x["eval"]:
      assert abs(x["eval"][name] - y["eval"][name]) <= tolerance, (x["round"], name)
    assert x["communication"] == y["communication"]


def _in_process_exchange(root, num_clients):
  """Each request answered by its node's handler, here (the nodes' state dirs under root)."""
  def exchange(round_index, requests):
    return [client_app.train_reply(content, {"partition-id": k, "num-partitions": num_clients, "crash-in-round": -1,
                                             "state-dir": os.path.join(root, f"node-{k}")})
            for k, _, content in requests]
  return exchange


@pytest.mark.parametrize("algorithm", ["flora", "scaffold"])
def test_protocol_matches_simulation(tmp_path, make_config, algorithm):
  """FLoRA (stacked broadcast, base merged on the nodes' replicas) and SCAFFOLD (server-held client states):
  with 2 of 3 clients per round, a node that sat a round out catches up from the broadcasts it missed."""
  config = make_config(**{"fl.rounds": 3, "fl.algorithm": algorithm, "fl.clients_per_round": 2})
  experiment.run(config, str(tmp_path / "sim"))
  experiment.run(config, str(tmp_path / "fl"), remote_clients=lambda exp: server_app.FlowerClients(
      exp, _in_process_exchange(str(tmp_path), exp.num_clients), {k: 100 + k for k in range(exp.num_clients)},
      str(tmp_path / "fl")))
  _assert_same_run(tmp_path / "sim", tmp_path / "fl", tolerance=1e-5)
  wire = _records(tmp_path / "fl" / "flower.jsonl")
  comm = _records(tmp_path / "fl" / "metrics.jsonl")[-1]["communication"]
  # Up: the trained tree + loss and finiteness (SCAFFOLD's control variates are updated where its client
  # states live, on the server, from that tree: half its accounted upload travels).
  trained = comm["upload_per_client"] // 2 if algorithm == "scaffold" else comm["upload_per_client"]
  assert all(up == trained + 5 for r in wire for up in r["upload_array_bytes"])
  if algorithm == "scaffold":  # start, control correction and 16 bytes of key and schedule position
    assert all(down == comm["download_per_client"] + 16 for r in wire for down in r["download_array_bytes"])
  else:  # key and schedule position, then the broadcast of each round the node has not seen (2 clients' factors)
    broadcast = 2 * comm["upload_per_client"] + 8
    missed = [(down - 16) / broadcast for r in wire[1:] for down in r["download_array_bytes"]]
    assert all(m in (1, 2) for m in missed) and 2 in missed, missed


def test_partitions_must_match_the_config():
  assert server_app.match_partitions({7: (1, 2), 9: (0, 2)}, 2) == {0: 9, 1: 7}
  with pytest.raises(RuntimeError, match=r"partition-id=5 num-partitions=2.*config.fl.num_clients=2"):
    server_app.match_partitions({7: (5, 2), 9: (0, 2)}, 2)
  with pytest.raises(RuntimeError, match="both have partition-id=0"):
    server_app.match_partitions({7: (0, 2), 9: (0, 2)}, 2)
  with pytest.raises(ValueError, match="partition-id=3 is outside"):
    client_app.check_partition({"partition-id": 3, "num-partitions": 4}, 3)
  with pytest.raises(ValueError, match="needs --node-config"):
    client_app.node_settings({})


def test_missing_flower_is_named(monkeypatch):
  import importlib.util
  from frlora_jax import flower
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(SystemExit, match=r"pip install -e '\.\[flower\]'"):
    flower.require_flower()


def _config_file(tmp_path, tiny_model_dir, sentiment_csv) -> str:
  return tiny_config_file(tmp_path / "tiny_config.py", tiny_model_dir, sentiment_csv,
                          **{"fl.num_clients": 2, "fl.rounds": 2, "optim.lr": 2e-2})


def _no_process_left(marker: str):
  left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
  assert not left, f"processes left running: {left}"


def test_local_deployment_frlora_matches_simulation(tmp_path, tiny_model_dir, sentiment_csv, make_config):
  """`python -m frlora_jax.flower.local`: SuperLink + 2 SuperNodes, FRLoRA for 2 rounds; FRLoRA's nodes
  receive the averaged factors and head (its `downloads`), never the residual base."""
  config_file = _config_file(tmp_path, tiny_model_dir, sentiment_csv)
  workdir = tmp_path / "flower_run"
  bad = subprocess.run([sys.executable, "-m", "frlora_jax.flower.local", "--config", config_file, "--workdir",
                        str(workdir), "--supernodes", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "--supernodes=3 differs from config.fl.num_clients=2" in bad.stderr
  assert not (workdir / "flower").exists()  # refused before anything started
  done = subprocess.run([sys.executable, "-m", "frlora_jax.flower.local", "--config", config_file, "--workdir",
                         str(workdir), "--supernodes", "2", "--timeout", "300", "--config.fl.algorithm=frlora"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  _no_process_left(str(workdir))
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  config = make_config()
  config.fl.num_clients, config.fl.rounds, config.optim.lr, config.fl.algorithm = 2, 2, 2e-2, "frlora"
  experiment.run(config, str(tmp_path / "sim"))
  _assert_same_run(tmp_path / "sim", workdir)
  wire = _records(workdir / "flower.jsonl")
  comm = _records(workdir / "metrics.jsonl")[-1]["communication"]
  assert [r["download_array_bytes"] for r in wire[1:]] == [[comm["download_per_client"] + 20] * 2]


def test_deployment_fedavg_matches_simulation_and_names_a_crashed_client(tmp_path, make_config):
  """FedAvg for 2 rounds over 2 SuperNodes equals the simulation; extended to 3 rounds (a resume: nodes get
  a snapshot) the node of client 1 fails in round 3: the run stops with its node id, nothing hangs, and
  round 2's checkpoint stays."""
  config = make_config()
  config.fl.num_clients, config.fl.rounds, config.optim.lr, config.fl.algorithm = 2, 2, 2e-2, "fedavg"
  experiment.run(config, str(tmp_path / "sim"))
  workdir = str(tmp_path / "flower_run")
  with local.Deployment(os.path.join(workdir, "flower"), 2, extra_node_config={1: "crash-in-round=2"}) as nodes:
    code = nodes.run_app(local.prepare(config, workdir, timeout=300))
    local.check_outcome(workdir, code)
    _assert_same_run(tmp_path / "sim", workdir)
    config.fl.rounds = 3
    code = nodes.run_app(local.prepare(config, workdir, timeout=300))
  _no_process_left(workdir)
  with pytest.raises(RuntimeError, match=r"Round 3: client 1 \(node \d+\) failed: .*crash-in-round=2"):
    local.check_outcome(workdir, code)
  assert [r["round"] for r in _records(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]
