"""Every shipped config file loads without sys.path tricks, passes the checks, and carries its stated settings."""
import glob
import os

import pytest

from conftest import ROOT
from frlora_jax import config_checks, recipes
from frlora_jax.config_files import load

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_passes_checks(path):
  assert "sys.path" not in open(path).read()
  if path.endswith("default.py"):  # the bare defaults: a template that needs data
    with pytest.raises(ValueError, match="config.data.path is empty"):
      config_checks.check(load(path))
  else:
    config_checks.check(load(path))


@pytest.mark.parametrize("name", ["qnli", "rte", "cola", "twenty_news"])
def test_official_variant_is_the_published_code(name):
  c = load(os.path.join(ROOT, "configs", f"{name}.py"), "official")
  config_checks.check(c)
  assert (c.lora.freeze_a, c.fl.weighting, c.fl.server_rule, c.fl.keep_optimizer_state) == (True, "uniform",
                                                                                            "official", True)


@pytest.mark.parametrize("name, max_length, local_steps, rounds, batch, accum", [
    ("metamathqa", 512, 10, 100, 16, 1), ("alpaca_gpt4", 512, 10, 100, 16, 1),  # OpenFedLLM run_sft.sh
    ("fed_aya", 1024, 10, 200, 4, 4), ("fed_chatbotit", 1024, 5, 100, 4, 4),    # FedLLM-Bench's scripts
    ("fed_wildchat", 1024, 10, 100, 4, 4),
])
def test_nlg_configs_carry_the_benchmark_codes_settings(name, max_length, local_steps, rounds, batch, accum):
  c = load(os.path.join(ROOT, "configs", f"{name}.py"))
  assert tuple(c.lora.targets) == recipes.PEFT_LLAMA_DEFAULT_TARGETS  # no target_modules: PEFT's q_proj, v_proj
  assert (c.data.max_length, c.fl.local_steps, c.fl.rounds) == (max_length, local_steps, rounds)
  assert (c.optim.batch_size, c.optim.grad_accum) == (batch, accum)
  assert (c.optim.schedule, c.optim.min_lr, c.lora.dropout, c.lora.alpha) == ("round_cosine", 1e-6, 0.05,
                                                                               2 * c.lora.rank)
