"""What a run leaves in its workdir: config.json, metrics.jsonl, TensorBoard events, curves.png.

metrics.jsonl is append-only with one JSON object per round. On resume it is
rewritten (atomically) from the records stored in the checkpoint, so a resumed
run's file equals an uninterrupted one's.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import types


def write_atomic(path: str, text: str) -> None:
  """Write via a temp file and rename: readers see the old or the new file, never half."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def read_metrics(path: str) -> list[dict]:
  """Rounds recorded in a metrics.jsonl; a torn last line (crash mid-write) is dropped."""
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          break
  return records


class Progress:
  """A bar per run on a terminal; a plain line per round otherwise."""

  def __init__(self, start: int, total: int):
    self.tty = sys.stderr.isatty()
    self.bar = None
    if self.tty:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="round", dynamic_ncols=True)
    self.total = total

  def update(self, record: dict, metric: str) -> None:
    text = f"loss {record['train_loss']:.4f}"
    if "eval" in record:
      text += f" | eval {metric} {record['eval'][metric]:.4f}"
    if self.bar is not None:
      self.bar.set_postfix_str(text)
      self.bar.update(1)
    else:
      print(f"round {record['round']}/{self.total} | {text} | {record['seconds']:.1f}s", flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class ClientBar:
  """A per-client bar inside long rounds, on a terminal only (ticked from compiled code, which
  calls `tick` whether or not a bar is shown, so the program never depends on the terminal)."""

  LONG_ROUND_S = 10.0

  def __init__(self):
    self.bar = None

  def start(self, clients: int, last_round_s: float) -> None:
    if last_round_s >= self.LONG_ROUND_S and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=clients, unit="client", leave=False, dynamic_ncols=True)

  def tick(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def stop(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


class RunLog:
  def __init__(self, workdir: str, config, history: list[dict], write: bool = True):
    """history: the records of the rounds already done (from the checkpoint).

    write=False: a multi-process run's other processes, which log nothing (process 0 does).
    """
    self.workdir, self.writes = workdir, write
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.file = None
    self.tensorboard = None
    if not write:
      return
    resume_from = history[-1]["round"] if history else 0
    write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    self.rewrite(history)
    try:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_from + 1)
    except ImportError:
      pass

  def rewrite(self, records: list[dict]) -> None:
    """Replace metrics.jsonl by `records` (atomically) and keep appending after them."""
    if not self.writes:
      return
    if self.file is not None and not self.file.closed:
      self.file.close()
    write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    self.file = open(self.metrics_path, "a")

  def progress(self, start: int, total: int):
    if not self.writes:
      return contextlib.nullcontext(types.SimpleNamespace(update=lambda *args: None))
    return contextlib.closing(Progress(start, total))

  def write(self, record: dict) -> None:
    if not self.writes:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    os.fsync(self.file.fileno())
    if self.tensorboard is not None:
      step = record["round"]
      for name in ("train_loss", "seconds"):
        if name in record:
          self.tensorboard.add_scalar(f"train/{name.replace('train_', '')}", record[name], step)
      for name, value in record.get("eval", {}).items():
        self.tensorboard.add_scalar(f"eval/{name}", value, step)

  def close(self) -> None:
    if self.file is not None and not self.file.closed:
      self.file.close()
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None

  def finish(self) -> None:
    """Draw curves.png from the whole metrics.jsonl."""
    if not self.writes:
      return
    from frlora_jax import plots
    records = read_metrics(self.metrics_path)
    if any("eval" in r for r in records):
      plots.run_curves(records, os.path.join(self.workdir, "curves.png"))
