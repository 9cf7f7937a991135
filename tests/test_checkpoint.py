"""Checkpoints: kill-and-resume equality, partial checkpoints ignored, refused resumes, NaN stop."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from frlora_jax import checkpoint, experiment


def _cli(tiny_model_dir, sentiment_csv, workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/default.py",
          f"--workdir={workdir}", f"--config.model.name={tiny_model_dir}", f"--config.data.path={sentiment_csv}",
          "--config.data.max_length=32", "--config.fl.num_clients=3", "--config.fl.local_steps=25",
          "--config.lora.rank=4", "--config.optim.batch_size=8", "--config.fl.executor=map",
          "--config.checkpoint_every=1", "--config.eval_every=3", "--config.fl.keep_optimizer_state=True",
          "--config.fl.rounds=10", *extra]


def _records(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  for r in records:
    r.pop("seconds")
  return records


def _interrupt_after(cmd, workdir, rounds, sig):
  process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(path) and sum(1 for _ in open(path)) >= rounds:
      process.send_signal(sig)
      break
    time.sleep(0.01)
  _, err = process.communicate(timeout=300)
  return process.returncode, err


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, sentiment_csv, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = subprocess.run(_cli(tiny_model_dir, sentiment_csv, workdir), capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def test_sigkill_and_resume_is_bit_identical(tiny_model_dir, sentiment_csv, tmp_path, reference_run):
  cmd = _cli(tiny_model_dir, sentiment_csv, tmp_path)
  code, err = _interrupt_after(cmd, tmp_path, 4, signal.SIGKILL)
  assert code == -signal.SIGKILL, f"the run was not killed mid-way (exit {code}): {err[-1000:]}"
  assert len(_records(tmp_path)) < 10
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  assert _records(tmp_path) == _records(reference_run)  # every loss and metric, to the last bit


def test_ctrl_c_saves_and_resumes(tiny_model_dir, sentiment_csv, tmp_path, reference_run):
  cmd = _cli(tiny_model_dir, sentiment_csv, tmp_path, "--config.checkpoint_every=100")
  code, err = _interrupt_after(cmd, tmp_path, 3, signal.SIGINT)
  assert code == 130, err[-1000:]
  saved = len(_records(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == [str(saved)]  # the interrupt saved the last logged round
  assert subprocess.run(cmd, capture_output=True, cwd=ROOT).returncode == 0
  assert _records(tmp_path) == _records(reference_run)


def test_partial_checkpoint_is_ignored(make_config, tmp_path):
  config = make_config(**{"fl.rounds": 2})
  experiment.run(config, str(tmp_path))
  # a save cut off mid-write leaves Orbax's temporary folder; it must never be restored
  partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
  partial.mkdir()
  (partial / "garbage").write_bytes(b"\x00" * 10)
  _, step, _ = checkpoint.restore_state(str(tmp_path))
  assert step == 2
  config.fl.rounds = 3
  records = experiment.run(config, str(tmp_path))
  assert [r["round"] for r in records] == [3]


def test_incompatible_resume_is_refused_and_rounds_can_grow(make_config, tmp_path):
  experiment.run(make_config(**{"fl.rounds": 2}), str(tmp_path))
  for change in ({"lora.rank": 2}, {"seed": 1}, {"fl.algorithm": "fedavg"}, {"fl.num_clients": 4}):
    with pytest.raises(ValueError, match="Refusing to resume.*" + list(change)[0].replace(".", r"\.")):
      experiment.run(make_config(**{"fl.rounds": 3, **change}), str(tmp_path))
  records = experiment.run(make_config(**{"fl.rounds": 3, "data.eval_buckets": False}), str(tmp_path))
  assert [r["round"] for r in records] == [3]  # eval padding may change on resume: it changes no training
  assert [r["round"] for r in _records(tmp_path)] == [1, 2, 3]


def test_restore_gives_the_evaluated_global_model(make_config, tmp_path):
  config = make_config(**{"fl.rounds": 2})
  records = experiment.run(config, str(tmp_path))
  params, saved_config = checkpoint.restore(str(tmp_path))
  assert saved_config.lora.rank == config.lora.rank
  exp = experiment.build(config)
  empty_lora = {}  # merged params: no LoRA branch needed
  predictions = []
  for batch in exp.data.eval_batches:
    pred, _ = exp.predict(params, empty_lora, {}, {k: v for k, v in batch.items() if k != "valid"})
    predictions.append(np.asarray(pred)[batch["valid"]])
  labels = np.concatenate([b["labels"][b["valid"]] for b in exp.data.eval_batches])
  accuracy = float((np.concatenate(predictions) == labels).mean())
  assert accuracy == pytest.approx(records[-1]["eval"]["accuracy"], abs=1e-9)


def test_non_finite_update_stops_with_round_and_clients(make_config, tmp_path):
  config = make_config(**{"fl.rounds": 3, "optim.lr": float("inf")})
  with pytest.raises(experiment.NonFiniteError, match=r"Round 1: non-finite loss or update from client\(s\) \[0, 1, 2\]"):
    experiment.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_corrupt_checkpoint_falls_back_to_the_previous_one(make_config, tmp_path):
  config = make_config(**{"fl.rounds": 3, "keep_checkpoints": 3})
  experiment.run(config, str(tmp_path))
  full = _records(tmp_path)
  # damage every data file of the newest checkpoint, as a bad disk would
  for folder, _, files in os.walk(tmp_path / "checkpoints" / "3" / "state"):
    for name in files:
      if not name.endswith(".txt"):
        with open(os.path.join(folder, name), "r+b") as f:
          f.write(b"\xff" * 64)
  (tmp_path / "metrics.jsonl").write_text("")  # the log is rebuilt from the checkpoint, not trusted
  redone = experiment.run(config, str(tmp_path))
  assert [r["round"] for r in redone] == [3]
  assert _records(tmp_path) == full


def test_a_field_added_after_the_run_started_resumes_only_at_its_default(make_config):
  """Runs saved before a config field existed resume if the field keeps its default."""
  config = make_config()
  saved = checkpoint.identity(config)
  del saved["fl.natural_largest"]  # as saved by a version without this field
  checkpoint.check_compatible(saved, config)
  config.fl.natural_largest = 3
  with pytest.raises(ValueError, match=r"config\.fl\.natural_largest: saved None, now 3"):
    checkpoint.check_compatible(saved, config)


def test_no_restorable_checkpoint_stops_instead_of_starting_over(make_config, tmp_path):
  config = make_config(**{"fl.rounds": 2, "keep_checkpoints": 2})
  experiment.run(config, str(tmp_path))
  log = (tmp_path / "metrics.jsonl").read_text()
  for step in ("1", "2"):  # every checkpoint damaged (or written by an incompatible version)
    for folder, _, files in os.walk(tmp_path / "checkpoints" / step / "state"):
      for name in files:
        if not name.endswith(".txt"):
          with open(os.path.join(folder, name), "r+b") as f:
            f.write(b"\xff" * 64)
  config.fl.rounds = 3
  with pytest.raises(RuntimeError, match=r"No checkpoint in .*checkpoints restores \(step 2: .*step 1: .*Nothing was changed"):
    experiment.run(config, str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text() == log


def test_lean_checkpoint_holds_only_the_targeted_kernels(make_config, tmp_path):
  from flax import traverse_util
  config = make_config(**{"fl.rounds": 1})
  experiment.run(config, str(tmp_path))
  raw, step, base_record = checkpoint.restore_state(str(tmp_path))
  saved = {key[:-1] for key in traverse_util.flatten_dict(raw["server"]["base"])}
  targets = {key[:-1] for key in traverse_util.flatten_dict(raw["server"]["lora"])}
  assert saved == targets and all(key[-1] == "kernel" for key in traverse_util.flatten_dict(raw["server"]["base"]))
  assert base_record["model"] == config.model.name and len(base_record["fingerprint"]) == 32


def test_changed_pretrained_weights_are_refused(make_config, tiny_model_dir, tmp_path):
  """The checkpoint rebuilds the base from the pre-trained weights: if they changed, resume and restore refuse."""
  import shutil
  from transformers import FlaxBertForSequenceClassification
  model_dir = str(tmp_path / "model")
  shutil.copytree(tiny_model_dir, model_dir)
  config = make_config(**{"fl.rounds": 1, "model.name": model_dir})
  experiment.run(config, str(tmp_path / "run"))
  model = FlaxBertForSequenceClassification.from_pretrained(model_dir)
  params = model.params
  params["bert"]["embeddings"]["word_embeddings"]["embedding"] = params["bert"]["embeddings"]["word_embeddings"][
      "embedding"] * 1.01  # not a LoRA target: only the fingerprint can tell
  model.save_pretrained(model_dir, params=params)
  config.fl.rounds = 2
  with pytest.raises(ValueError, match=r"checkpoints/1 was saved on top of pre-trained weights with fingerprint"):
    experiment.run(config, str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"now loads weights with fingerprint"):
    checkpoint.restore(str(tmp_path / "run"))
