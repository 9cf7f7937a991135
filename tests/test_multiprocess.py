"""Multi-process runs on jax.distributed (distributed.py): 2 processes x 2 CPU devices on 127.0.0.1.

Every process started here is stopped in a `finally`, whatever the test's outcome.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_config_file
from frlora_jax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _config_file(tmp_path, tiny_model_dir, sentiment_csv) -> str:
  return tiny_config_file(tmp_path / "tiny_config.py", tiny_model_dir, sentiment_csv,
                          **{"fl.num_clients": 5, "optim.lr": 2e-2})


def _start(config_file, workdir, port, process_id, *extra):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", config_file, "--workdir", str(workdir),
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process_id),
       "--distributed_timeout", "10", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(processes):
  for p in processes:
    if p.poll() is None:
      p.kill()
    p.wait(timeout=30)


def _run_two(config_file, workdir, *extra, timeout=300):
  port, processes = _free_port(), []
  try:
    processes = [_start(config_file, workdir, port, i, *extra) for i in range(2)]
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [p.returncode for p in processes], outputs
  finally:
    _stop(processes)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path, tiny_model_dir, sentiment_csv, make_config):
  config_file = _config_file(tmp_path, tiny_model_dir, sentiment_csv)
  codes, outputs = _run_two(config_file, tmp_path / "two", "--config.fl.rounds=3")
  assert codes == [0, 0], outputs
  assert "round 3/3" in outputs[0] and "round 1/3" not in outputs[1]  # only process 0 reports
  single = make_config(**{"fl.num_clients": 5, "optim.lr": 2e-2, "fl.rounds": 3})
  experiment.run(single, str(tmp_path / "one"))
  two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
  assert [r["round"] for r in two] == [1, 2, 3]
  for a, b in zip(two, one):
    assert a["clients"] == b["clients"] and a["communication"] == b["communication"]
    np.testing.assert_allclose(a["client_losses"], b["client_losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    for name, value in b["eval"].items():
      np.testing.assert_allclose(a["eval"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
  assert len(two) == 3 and two[-1]["eval"]["loss"] < two[0]["eval"]["loss"] * 1.5  # sane, and finite
  assert os.path.exists(tmp_path / "two" / "curves.png")
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "3"]


def test_a_killed_process_stops_the_other_and_the_rerun_resumes(tmp_path, tiny_model_dir, sentiment_csv):
  config_file = _config_file(tmp_path, tiny_model_dir, sentiment_csv)
  workdir, port, processes = tmp_path / "run", _free_port(), []
  try:
    processes = [_start(config_file, workdir, port, i, "--config.fl.rounds=200", "--config.keep_checkpoints=3")
                 for i in range(2)]
    deadline = time.time() + 240
    while time.time() < deadline:
      if os.path.exists(workdir / "metrics.jsonl") and len(_metrics(workdir)) >= 3:
        break
      assert processes[0].poll() is None, processes[0].communicate()[0]
      time.sleep(0.5)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    output = processes[0].communicate(timeout=120)[0]
    waited = time.time() - killed_at
  finally:
    _stop(processes)
  assert processes[0].returncode != 0
  assert ("Another process most likely died" in output
          or "JAX distributed service detected fatal errors" in output), output[-3000:]
  assert waited < 60  # well within the 10 s heartbeat timeout x3 for shutdown
  # complete checkpoints only: a save the kill interrupted is left as <step>.orbax-checkpoint-tmp and ignored
  saved = max(int(step) for step in os.listdir(workdir / "checkpoints") if step.isdigit())
  codes, outputs = _run_two(config_file, workdir, f"--config.fl.rounds={saved + 2}")
  assert codes == [0, 0], outputs
  assert f"round {saved + 1}/{saved + 2}" in outputs[0] and "round 1/" not in outputs[0]  # resumed, not restarted
  assert [r["round"] for r in _metrics(workdir)] == list(range(1, saved + 3))


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address", "localhost", "--num_processes", "2", "--process_id", "0"], "must be HOST:PORT"),
    (["--coordinator_address", "127.0.0.1:1234", "--num_processes", "2", "--process_id", "2"],
     "--process_id=2 must be in [0, 2)"),
    (["--coordinator_address", "127.0.0.1:1234", "--num_processes", "1", "--process_id", "0"],
     "needs >= 2 processes"),
])
def test_bad_distributed_flags_are_named_before_any_work(tmp_path, tiny_model_dir, sentiment_csv, flags, message):
  config_file = _config_file(tmp_path, tiny_model_dir, sentiment_csv)
  result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config_file, "--workdir",
                           str(tmp_path / "w"), *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")


def _join(port: int, num_processes: int, process_id: int, timeout_s: int) -> subprocess.Popen:
  code = ("from frlora_jax import distributed; "
          f"distributed.initialize('127.0.0.1:{port}', {num_processes}, {process_id}, timeout_s={timeout_s}); "
          "print('joined', flush=True)")
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


@pytest.mark.parametrize("counts, failing, message", [
    ((2, 3), 1, "give every process the same --num_processes"),   # the coordinator's count wins: named at once
    ((3, 2), 0, "if they do not all join within 9 s"),  # jax aborts after the wait; the flags were named first
])
def test_mismatched_process_counts_are_named(counts, failing, message):
  port = _free_port()
  processes = [_join(port, n, i, timeout_s=3) for i, n in enumerate(counts)]
  try:
    outputs = [p.communicate(timeout=90)[0] for p in processes]
  finally:
    _stop(processes)
  assert processes[failing].returncode != 0 and message in outputs[failing], outputs[failing][-2000:]
