"""The ClientApp: a Flower node plays one client of the config (its node-config `partition-id`).

Node config (flower-supernode --node-config "..."):
- partition-id: the client this node plays, 0 .. config.fl.num_clients - 1;
- num-partitions: config.fl.num_clients (checked, so a node started for another config is named);
- state-dir: where the node keeps its replica of the global model between rounds (sync.py) and
  JAX's compilation cache; default ~/.cache/frlora_jax/flower/node-<partition-id>;
- compilation-cache: false turns JAX's persistent compilation cache off (on by default);
- crash-in-round: fault injection for tests of the server's failure handling (0-based round; -1 off).

Each message brings the config (JSON), the round's client inputs and the broadcasts the node
missed; the node builds data and model from the config (its partition of the data stays here),
brings its replica up to date, runs the project's jitted local update and replies with what
the client uploads. Flower starts a fresh process per message, so the model is loaded and the
update compiled each round; JAX's persistent compilation cache in state-dir cuts the compile.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

QUERY_KEYS = ("partition-id", "num-partitions")


def node_settings(node_config) -> dict:
  """The node's settings from its node-config, with defaults; bad values name the key and the fix."""
  if "partition-id" not in node_config:
    raise ValueError("flower-supernode needs --node-config \"partition-id=K num-partitions=N\": K is the client "
                     "this node plays, 0 .. config.fl.num_clients - 1.")
  partition = int(node_config["partition-id"])
  settings = {"partition-id": partition, "num-partitions": int(node_config.get("num-partitions", -1)),
              "crash-in-round": int(node_config.get("crash-in-round", -1)),
              "compilation-cache": str(node_config.get("compilation-cache", "true")).lower() not in ("false", "0")}
  settings["state-dir"] = str(node_config.get("state-dir", "")) or os.path.join(
      os.path.expanduser("~/.cache/frlora_jax/flower"), f"node-{partition}")
  return settings


def check_partition(settings: dict, num_clients: int) -> None:
  partition, partitions = settings["partition-id"], settings["num-partitions"]
  if not 0 <= partition < num_clients:
    raise ValueError(f"node-config partition-id={partition} is outside this config's clients 0 .. {num_clients - 1} "
                     f"(config.fl.num_clients={num_clients}); start the SuperNode with a partition-id in that range.")
  if partitions not in (-1, num_clients):
    raise ValueError(f"node-config num-partitions={partitions} differs from config.fl.num_clients={num_clients}; "
                     f"start every SuperNode with num-partitions={num_clients}.")


@app.query()
def query(msg: Message, context: Context) -> Message:
  """The node's partition, so the server knows which node plays which client."""
  settings = node_settings(context.node_config)
  return Message(RecordDict({"node": ConfigRecord({k: settings[k] for k in QUERY_KEYS})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
  return Message(train_reply(msg.content, node_settings(context.node_config)), reply_to=msg)


def train_reply(content: RecordDict, settings: dict) -> RecordDict:
  """The reply to a round's message: the trained client's output and the node's timings."""
  t0 = time.time()
  os.makedirs(settings["state-dir"], exist_ok=True)
  if settings.get("compilation-cache", True):
    _use_compilation_cache(os.path.join(settings["state-dir"], "jax_cache"))
  output, timing = local_round(content, content["round"], settings)
  timing["node_seconds"] = time.time() - t0
  from frlora_jax.flower import wire
  return RecordDict({"output": wire.to_record(output), "timing": MetricRecord(timing)})


def _use_compilation_cache(path: str) -> None:
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def local_round(content: RecordDict, meta: ConfigRecord, settings: dict):
  """(ClientOutput of this node's client, timings): replica up to date, then the local update."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from frlora_jax import client, experiment
  from frlora_jax.flower import sync, wire

  round_index, client_id, version = int(meta["round"]), int(meta["client"]), int(meta["version"])
  if round_index == settings["crash-in-round"]:
    raise RuntimeError(f"crash-in-round={round_index}: this node was told to fail here (fault injection).")
  t0 = time.time()
  exp = built(str(meta["config"]))
  check_partition(settings, exp.num_clients)
  if client_id != settings["partition-id"]:
    raise ValueError(f"The server sent client {client_id}'s round to the node with partition-id="
                     f"{settings['partition-id']}.")
  algorithm, initial = exp.algorithm, exp.initial_server
  template, _ = experiment.start_round(experiment.fresh_state(exp.config, algorithm, initial, exp.num_clients),
                                       jnp.asarray([client_id], jnp.int32), jnp.int32(round_index),
                                       jnp.int32(exp.config.fl.rounds), exp.train_batches.counts,
                                       algorithm=algorithm, plan=experiment.RoundPlan.from_config(exp.config))
  template = client.take(template, 0)
  replaying = sync.replays(algorithm, initial)
  inputs = wire.from_record(content["input"], template.replace(start=None) if replaying else template)
  timing = {"setup_seconds": time.time() - t0}
  base = initial.base
  if replaying:
    t1 = time.time()
    replica = up_to_date_replica(content, meta, settings, exp, version)
    server = sync.with_base(replica, initial.base)
    base = server.base
    start = algorithm.client_start(server, None)
    if inputs.rank_mask is not None and algorithm.rank_heterogeneity == "truncate":
      from frlora_jax import ranks
      start = dict(start, lora=ranks.mask_lora(start["lora"], inputs.rank_mask))
    inputs = inputs.replace(start=start)
    timing["replay_seconds"] = time.time() - t1
  t2 = time.time()
  stacked = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], inputs)
  stacked = stacked.replace(batches=exp.train_batches.for_round(round_index, np.asarray([client_id])))
  output = jax.block_until_ready(exp.train_clients({"base": base}, stacked))
  timing["train_seconds"] = time.time() - t2
  return client.take(output, 0), timing


@functools.lru_cache(maxsize=1)
def built(config_json: str):
  """The node's experiment (data, model, jitted update) for a config; kept while the process lives."""
  from frlora_jax import checkpoint, experiment
  return experiment.build(checkpoint.config_from_json(config_json), progress=False)  # no host callback: cacheable


def up_to_date_replica(content: RecordDict, meta: ConfigRecord, settings: dict, exp, version: int):
  """This node's replica after `version` rounds: from disk, a snapshot, and the broadcasts it missed."""
  import jax
  import jax.numpy as jnp
  from frlora_jax import checkpoint
  from frlora_jax.flower import sync, wire

  algorithm = exp.algorithm
  fresh = sync.lean(exp.initial_server, algorithm)
  digest = hashlib.sha256((json.dumps(checkpoint.identity(exp.config), sort_keys=True) + exp.base_fingerprint)
                          .encode()).hexdigest()
  path = os.path.join(settings["state-dir"], "replica.msgpack")
  replica, applied = sync.load_replica(path, fresh, digest)
  if "snapshot" in content:
    replica, applied = wire.from_record(content["snapshot"], fresh), version
  trainable = algorithm.client_start(exp.initial_server, None)
  for r in range(applied, version):
    key = f"sync.{r}"
    if key not in content:
      raise RuntimeError(f"This node's replica is at round {applied} but the server sent no broadcast of round "
                         f"{r + 1}; delete node-config state-dir={settings['state-dir']!r} to resynchronise.")
    m = sync.broadcast_clients(exp.config, exp.num_clients, r, algorithm)
    like = {"trainables": jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (m,) + x.shape), trainable),
            "weights": jnp.zeros((m,), jnp.float32)}
    payload = wire.from_record(content[key], like)
    replica = sync.replay(replica, exp.initial_server.base, payload["trainables"], payload["weights"],
                          algorithm=algorithm)
  sync.check_checksum(sync.checksum(replica), float(meta["checksum"]), version)
  sync.save_replica(path, replica, version, digest)
  return replica
