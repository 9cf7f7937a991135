"""README's "Write your own algorithm" runs as written: the rule file, train.py, compare and the notebook loop.

The file and the snippets are taken from README.md verbatim; only the model and data are swapped for the
tiny test ones (command-line overrides for train.py and compare, the demo recipe for the notebook).
"""
import json
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT

SECTION = "## Write your own algorithm"


def _section_blocks():
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text[text.index(SECTION):]
  section = section[:section.index("\n## ", len(SECTION))]
  return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def _tiny_overrides(model_dir, csv_path):
  return [f"--config.model.name={model_dir}", "--config.data.task=custom", "--config.data.source=csv",
          f"--config.data.path={csv_path}", "--config.data.text_fields=('text',)", "--config.data.label_field=label",
          "--config.data.label_names=()", "--config.data.drop_labels=()", "--config.data.max_length=32",
          "--config.data.max_eval_examples=0", "--config.fl.num_clients=3", "--config.fl.rounds=2",
          "--config.fl.local_steps=2", "--config.lora.rank=4", "--config.optim.batch_size=8",
          "--config.eval_batch_size=32", "--config.eval_every=1"]


def _run(cmd, cwd):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([cwd, os.path.join(ROOT, "tests")]))
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_readme_algorithm_example_runs_as_written(tiny_model_dir, sentiment_csv, tmp_path):
  blocks = _section_blocks()
  rule_file = next(code for lang, code in blocks if lang == "python" and code.startswith("# median_rule.py"))
  commands = next(code for lang, code in blocks if lang == "bash").strip().splitlines()
  notebook = next(code for lang, code in blocks if lang == "python" and code.startswith("import median_rule"))
  (tmp_path / "median_rule.py").write_text(rule_file)

  # train.py and compare, as written, plus the tiny model/data overrides
  for line in commands:
    argv = shlex.split(line)
    assert argv[0] == "python"
    argv[0] = sys.executable
    if argv[1] == "train.py":
      argv[1] = os.path.join(ROOT, "train.py")
    argv = [a.replace("runs/", str(tmp_path / "runs") + "/") for a in argv]
    _run(argv + _tiny_overrides(tiny_model_dir, sentiment_csv), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "runs" / "median" / "metrics.jsonl")]
  assert [r["round"] for r in records] == [1, 2] and {r["algorithm"] for r in records} == {"median"}
  assert 0.0 <= records[-1]["eval"]["accuracy"] <= 1.0
  results = open(tmp_path / "runs" / "cmp_median" / "results.md").read()
  assert all(f"| {name} | 1 |" in results for name in ("median", "fedavg", "frlora"))

  # the notebook loop, verbatim, with the demo recipe pointing at the tiny model and data
  prelude = ("import conftest\nfrom frlora_jax import recipes\n"
             f"recipes.offline_demo = lambda arg=None: conftest.tiny_config({tiny_model_dir!r}, {sentiment_csv!r})\n")
  out = _run([sys.executable, "-c", prelude + notebook], str(tmp_path))
  lines = [line for line in out.splitlines() if line[:2] in ("1 ", "2 ")]
  assert len(lines) == 2 and "'accuracy'" in lines[-1]
