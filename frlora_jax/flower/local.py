"""A complete Flower deployment on this machine, for tests and demos:

  python -m frlora_jax.flower.local --config configs/X.py --workdir DIR --supernodes N [--config.a=b]

starts a SuperLink and N SuperNodes on 127.0.0.1 (deployment engine, no Ray), runs the app
(server_app.py, client_app.py) with `flwr run`, and stops every process it started, whatever
happens. The workdir gets the usual outputs (metrics.jsonl, checkpoints, curves) plus
flower.jsonl (bytes on the wire, node timings) and flower/ (the app's pyproject.toml, Flower's
home, each node's state and the processes' logs). Telemetry and update checks are off and
nothing is installed at run time. Rerunning the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

APP_NAME = "frlora-jax-flower"
CONNECTION = "frlora-local"


def flower_env(home: str) -> dict:
  """The environment of every Flower process: no telemetry, no update check, no installs, our FLWR_HOME."""
  bin_dir = os.path.dirname(sys.executable)  # Flower's processes start each other by name (flower-superexec, ...)
  return dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_HOME=home,
              FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
              PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_app(folder: str, config_json: str, workdir: str, timeout: int) -> str:
  """The Flower app: a pyproject.toml naming the project's ServerApp and ClientApp and this run's settings."""
  os.makedirs(folder, exist_ok=True)
  toml = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "frlora_jax on Flower: the project's algorithms and local update (written by frlora_jax.flower.local)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "frlora-jax"

[tool.flwr.app.components]
serverapp = "frlora_jax.flower.server_app:app"
clientapp = "frlora_jax.flower.client_app:app"

[tool.flwr.app.config]
config-json = {json.dumps(config_json)}
workdir = {json.dumps(workdir)}
timeout = {timeout}
"""
  with open(os.path.join(folder, "pyproject.toml"), "w") as f:
    f.write(toml)
  return folder


def write_connection(home: str, port: int) -> None:
  """FLWR_HOME/config.toml: `flwr run` reaches the local SuperLink under the name CONNECTION."""
  os.makedirs(home, exist_ok=True)
  with open(os.path.join(home, "config.toml"), "w") as f:
    f.write(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')


def wait_for_port(port: int, process: subprocess.Popen, log: str, timeout: float = 60.0) -> None:
  """Until the SuperLink accepts connections (or stops, or the timeout passes: an error naming its log)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {log}.")
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise RuntimeError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}.")


class Deployment:
  """A SuperLink and SuperNodes on 127.0.0.1, stopped on exit (context manager)."""

  def __init__(self, root: str, supernodes: int, extra_node_config: dict[int, str] | None = None):
    """extra_node_config: {partition: "key=value ..."} added to that SuperNode's --node-config."""
    self.root, self.supernodes, self.extra_node_config = root, supernodes, extra_node_config or {}
    self.home = os.path.join(root, "home")
    self.env = flower_env(self.home)
    self.processes: list[subprocess.Popen] = []
    self.logs = os.path.join(root, "logs")
    os.makedirs(self.logs, exist_ok=True)
    self.port = free_port()

  def _start(self, name: str, command: list[str]) -> subprocess.Popen:
    log = open(os.path.join(self.logs, f"{name}.log"), "w")
    process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own group: stopping it stops the apps it spawned
    self.processes.append(process)
    return process

  def __enter__(self) -> "Deployment":
    try:
      self._start_all()
    except BaseException:
      self.__exit__()
      raise
    return self

  def _start_all(self) -> None:
    write_connection(self.home, self.port)
    bin_dir = os.path.dirname(sys.executable)
    self._start("superlink", [os.path.join(bin_dir, "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                              "--port", str(self.port), "--disable-runtime-dependency-installation"])
    wait_for_port(self.port, self.processes[0], os.path.join(self.logs, "superlink.log"))
    for k in range(self.supernodes):
      state_dir = os.path.join(self.root, f"node-{k}")
      self._start(f"supernode-{k}", [
          os.path.join(bin_dir, "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
          "--port", str(free_port()),
          "--node-config", f'partition-id={k} num-partitions={self.supernodes} state-dir="{state_dir}" '
          + self.extra_node_config.get(k, "")])

  def run_app(self, app_dir: str) -> int:
    """`flwr run` of the app on this deployment, its output streamed to ours; its exit code."""
    command = [os.path.join(os.path.dirname(sys.executable), "flwr"), "run", app_dir, CONNECTION, "--stream"]
    return subprocess.call(command, env=self.env)

  def __exit__(self, *exc) -> None:
    for process in reversed(self.processes):
      if process.poll() is None:
        try:
          os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
    deadline = time.time() + 15
    for process in self.processes:
      try:
        process.wait(timeout=max(0.1, deadline - time.time()))
      except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def cli() -> None:
  """python -m frlora_jax.flower.local (flags defined here, so importing this module defines none)."""
  config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:variant]).",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the deployment's state.")
  supernodes_flag = flags.DEFINE_integer("supernodes", None, "SuperNodes to start: one per client "
                                         "(config.fl.num_clients).")
  timeout_flag = flags.DEFINE_integer("timeout", 3600, "Seconds to wait for a round's replies (and for nodes to "
                                      "connect).")
  flags.mark_flags_as_required(["config", "workdir", "supernodes"])

  def main(argv) -> None:
    del argv
    from frlora_jax import config_checks
    from frlora_jax.flower import require_flower
    require_flower()
    config, workdir, supernodes = config_flag.value, os.path.abspath(workdir_flag.value), supernodes_flag.value
    try:
      config_checks.check(config)
      if supernodes != config.fl.num_clients:
        raise ValueError(f"--supernodes={supernodes} differs from config.fl.num_clients={config.fl.num_clients}: "
                         f"each SuperNode plays one client; pass --supernodes={config.fl.num_clients}.")
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    app_dir = prepare(config, workdir, timeout_flag.value)
    with Deployment(os.path.join(workdir, "flower"), supernodes) as deployment:
      code = deployment.run_app(app_dir)
    try:
      check_outcome(workdir, code)
    except RuntimeError as e:
      raise SystemExit(f"error: {e}") from None
    print(f"done: Flower run completed; outputs in {workdir}")

  app.run(main)


def prepare(config, workdir: str, timeout: int) -> str:
  """Write the run's config (JSON) and app under workdir/flower; returns the app folder for `flwr run`."""
  root = os.path.join(workdir, "flower")
  os.makedirs(root, exist_ok=True)
  config_json = os.path.join(root, "config.json")
  with open(config_json, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  status = os.path.join(root, "status.json")
  if os.path.exists(status):
    os.remove(status)
  shutil.rmtree(os.path.join(root, "home", "apps"), ignore_errors=True)
  return write_app(os.path.join(root, "app"), config_json, workdir, timeout)


def check_outcome(workdir: str, code: int) -> None:
  """Raise RuntimeError with the ServerApp's own error unless the run completed."""
  status, outcome = os.path.join(workdir, "flower", "status.json"), {}
  if os.path.exists(status):
    with open(status) as f:
      outcome = json.load(f)
  if code != 0 or outcome.get("status") != "completed":
    reason = outcome.get("error", f"flwr run exited with {code}; see {os.path.join(workdir, 'flower', 'logs')}")
    raise RuntimeError(f"the Flower run failed: {reason}")


if __name__ == "__main__":
  cli()
