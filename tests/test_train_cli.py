"""train.py end to end on a tiny model: a 2-round run writes well-formed outputs."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_two_round_run_writes_metrics(tiny_model_dir, sentiment_csv, tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/default.py",
         f"--workdir={workdir}", f"--config.model.name={tiny_model_dir}", f"--config.data.path={sentiment_csv}",
         "--config.data.max_length=32", "--config.fl.num_clients=3", "--config.fl.rounds=2",
         "--config.fl.local_steps=2", "--config.lora.rank=4", "--config.optim.batch_size=8",
         "--config.fl.executor=loop", "--config.eval_every=2"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["round"] for r in records] == [1, 2]
  for r in records:
    assert r["algorithm"] == "frlora" and r["train_loss"] > 0 and r["seconds"] > 0
    assert r["communication"]["upload_per_client"] > 0
  assert "eval" not in records[0]
  assert set(records[1]["eval"]) >= {"accuracy", "mcc", "macro_f1"}
  assert 0.0 <= records[1]["eval"]["accuracy"] <= 1.0
  saved = json.load(open(workdir / "config.json"))
  assert saved["fl"]["rounds"] == 2 and saved["model"]["name"] == tiny_model_dir
  assert (workdir / "curves.png").exists()
  assert "round 2/2" in result.stdout
