"""The ServerApp: `experiment.run` with each round's clients trained on Flower nodes.

Run config (pyproject.toml [tool.flwr.app.config], written by `frlora_jax.flower.local`):
- config-json: path of the run's config as JSON (the same fields as configs/*.py);
- workdir: where metrics.jsonl, checkpoints and plots go, as for train.py; flower.jsonl adds
  each round's bytes on the wire and node timings;
- timeout: seconds to wait for a round's replies before naming the nodes that did not answer.

Everything but the local updates runs here, in the same code as a simulation: sampling,
`start_round`, the algorithm's `aggregate` in `finish_round`, evaluation, logging, Orbax
checkpoints and resume. Each sampled client's node receives what sync.py says and sends back
its trained tree, loss and finiteness.
"""
from __future__ import annotations

import json
import os
import time
import traceback

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
  from frlora_jax import checkpoint, experiment
  settings = context.run_config
  workdir = str(settings["workdir"])
  status_path = os.path.join(workdir, "flower", "status.json")
  os.makedirs(os.path.dirname(status_path), exist_ok=True)
  try:
    with open(str(settings["config-json"])) as f:
      config = checkpoint.config_from_json(f.read())
    timeout = float(settings["timeout"])
    experiment.run(config, workdir, remote_clients=lambda exp: FlowerClients(
        exp, GridExchange(grid, timeout), partitions(grid, exp.num_clients, timeout), workdir))
  except BaseException as e:
    _write_status(status_path, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()})
    raise
  _write_status(status_path, {"status": "completed"})


def _write_status(path: str, status: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(status, f, indent=1)
  os.replace(path + ".tmp", path)


class FlowerClients:
  """The client phase of a round over Flower nodes (an `Experiment.remote_clients`).

  exchange(round_index, [(client id, node id, content)]) -> the replies' contents in that order
  (GridExchange over Flower; tests pass the nodes' handler directly); node_of: {client id: node id}.
  """

  def __init__(self, exp, exchange, node_of: dict[int, int], workdir: str):
    from frlora_jax.flower import sync
    self.exp, self.exchange, self.node_of, self.workdir = exp, exchange, node_of, workdir
    self.config_json = exp.config.to_json_best_effort()
    self.replaying = sync.replays(exp.algorithm, exp.initial_server)
    self.broadcasts: dict[int, dict] = {}      # round index -> that round's broadcast (replay mode)
    self.node_version: dict[int, int] = {}     # node id -> rounds its replica has applied (as sent)
    self.first_round: int | None = None

  def __call__(self, state, inputs, ids, round_index: int):
    import jax
    import numpy as np
    from frlora_jax import client, experiment, privacy
    from frlora_jax.flower import sync, wire

    exp, t0 = self.exp, time.time()
    version = int(state.round)
    if self.first_round is None:
      self.first_round = version
    sent = inputs.replace(start=None) if self.replaying else inputs
    checksum = sync.checksum(sync.lean(state.server, exp.algorithm)) if self.replaying else 0.0
    requests, down_arrays, down_messages = [], [], []
    for i, k in enumerate(np.asarray(ids).tolist()):
      trees = {"input": client.take(sent, i)}
      if self.replaying:
        trees.update(self._sync(self.node_of[k], state, version))
      content = RecordDict({name: wire.to_record(tree) for name, tree in trees.items()})
      content["round"] = ConfigRecord({"round": round_index, "client": k, "version": version, "checksum": checksum,
                                       "config": self.config_json})
      down_arrays.append(sum(wire.nbytes(tree) for tree in trees.values()))
      down_messages.append(sum(record.count_bytes() for record in content.values()))
      requests.append((k, self.node_of[k], content))
    replies = self.exchange(round_index, requests)
    like = client.ClientOutput(trainable=client.take(inputs.start, 0), opt_state=client.take(inputs.opt_state, 0)
                               if inputs.opt_state is not None else None,
                               loss=np.zeros((), np.float32), finite=np.zeros((), bool))
    outputs = [wire.from_record(reply["output"], like) for reply in replies]
    up_messages = [sum(record.count_bytes() for record in reply.values()) for reply in replies]
    output = jax.tree_util.tree_map(lambda *xs: jax.numpy.asarray(np.stack(xs)), *outputs)
    if self.replaying:
      for i, k in enumerate(np.asarray(ids).tolist()):
        self.node_version[self.node_of[k]] = version
      weights = jax.numpy.asarray(experiment.client_weights(exp.config.fl.weighting, exp.client_counts[ids]))
      trainables, weights = sync.broadcast(state, output.trainable, weights, None, algorithm=exp.algorithm,
                                           dp=privacy.client_level(exp.config))
      self.broadcasts[version] = jax.device_get({"trainables": trainables, "weights": weights})
      self._forget_old_broadcasts()
    timings = [{k: float(v) for k, v in reply["timing"].items()} for reply in replies]
    self.last_round = {"round": round_index + 1, "clients": np.asarray(ids).tolist(),
                       "download_array_bytes": down_arrays, "download_message_bytes": down_messages,
                       "upload_array_bytes": [wire.nbytes(out) for out in outputs], "upload_message_bytes": up_messages,
                       "client_phase_seconds": round(time.time() - t0, 4), "node_timings": timings}
    _append_jsonl(os.path.join(self.workdir, "flower.jsonl"), self.last_round)
    return output

  def _sync(self, node: int, state, version: int) -> dict:
    """The trees node `node` needs to bring its replica to `version` rounds: broadcasts, or a snapshot."""
    from frlora_jax.flower import sync
    applied = self.node_version.get(node, 0 if self.first_round == 0 else None)
    if applied is None or any(r not in self.broadcasts for r in range(applied, version)):
      return {"snapshot": sync.lean(state.server, self.exp.algorithm)} if version > 0 else {}
    return {f"sync.{r}": self.broadcasts[r] for r in range(applied, version)}

  def _forget_old_broadcasts(self) -> None:
    """Keep only the broadcasts some node still lacks (nodes never reached count from the first round)."""
    oldest = min(self.node_version.get(node, self.first_round) for node in self.node_of.values())
    for r in [r for r in self.broadcasts if r < oldest]:
      del self.broadcasts[r]



class GridExchange:
  """A round's requests as Flower messages over the Grid; a failed or silent client stops the run with its
  node id (the round is not committed: the last checkpoint is kept)."""

  def __init__(self, grid: Grid, timeout: float):
    self.grid, self.timeout = grid, timeout

  def __call__(self, round_index: int, requests: list) -> list:
    messages = [Message(content, dst_node_id=node, message_type="train", group_id=str(round_index + 1))
                for _, node, content in requests]
    by_node = {reply.metadata.src_node_id: reply for reply in self.grid.send_and_receive(messages,
                                                                                         timeout=self.timeout)}
    ordered, problems = [], []
    for k, node, _ in requests:
      reply = by_node.get(node)
      if reply is None:
        problems.append(f"client {k} (node {node}) sent no reply within {self.timeout:.0f} s")
      elif reply.has_error():
        problems.append(f"client {k} (node {node}) failed: {reply.error.reason}")
      else:
        ordered.append(reply.content)
    if problems:
      raise RuntimeError(f"Round {round_index + 1}: " + "; ".join(problems) + ". The run stopped; the last "
                         "checkpoint is kept and rerunning resumes from it.")
    return ordered


def partitions(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
  """{client id: node id}: waits for the config's num_clients nodes and asks each its partition-id."""
  deadline = time.time() + timeout
  nodes = []
  while time.time() < deadline:
    nodes = sorted(grid.get_node_ids())
    if len(nodes) >= num_clients:
      break
    time.sleep(1.0)
  if len(nodes) < num_clients:
    raise RuntimeError(f"Only {len(nodes)} SuperNode(s) connected within {timeout:.0f} s; this config has "
                       f"config.fl.num_clients={num_clients} clients, one per SuperNode.")
  queries = [Message(RecordDict({"query": ConfigRecord({"ask": "partition"})}), dst_node_id=node,
                     message_type="query") for node in nodes]
  answers, problems = {}, []
  for reply in grid.send_and_receive(queries, timeout=timeout):
    node = reply.metadata.src_node_id
    if reply.has_error():
      problems.append(f"node {node}: {reply.error.reason}")
    else:
      answers[node] = (int(reply.content["node"]["partition-id"]), int(reply.content["node"]["num-partitions"]))
  return match_partitions(answers, num_clients, problems)


def match_partitions(answers: dict[int, tuple[int, int]], num_clients: int, problems: list | None = None):
  """{client id: node id} from each node's (partition-id, num-partitions); any mismatch is one error naming
  the nodes and the node-config to use."""
  node_of, problems = {}, list(problems or [])
  for node, (partition, count) in sorted(answers.items()):
    if not 0 <= partition < num_clients or count not in (-1, num_clients):
      problems.append(f"node {node} has node-config partition-id={partition} num-partitions={count}, but this "
                      f"config has clients 0 .. {num_clients - 1} (config.fl.num_clients={num_clients})")
    elif partition in node_of:
      problems.append(f"nodes {node_of[partition]} and {node} both have partition-id={partition}")
    else:
      node_of[partition] = node
  missing = sorted(set(range(num_clients)) - set(node_of))
  if missing and not problems:
    problems.append(f"no node plays client(s) {missing}")
  if problems:
    raise RuntimeError("The SuperNodes do not match the config: " + "; ".join(problems) + ". Start one SuperNode "
                       f"per client with --node-config \"partition-id=K num-partitions={num_clients}\".")
  return node_of


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
