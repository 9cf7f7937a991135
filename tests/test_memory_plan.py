"""Memory plan from abstract shapes: remat shrinks saved activations, the estimate agrees with XLA's plan
without remat, and the LM memory benchmark runs at a tiny shape."""
import json
import os
import subprocess
import sys

from transformers import LlamaConfig

from conftest import ROOT
from frlora_jax import defaults, memory_plan

SHAPE = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _config(remat="none", param_dtype="float32"):
  c = defaults.get_config()
  c.model.name, c.model.remat, c.model.param_dtype = "random:llama", remat, param_dtype
  c.data.kind, c.data.max_length = "instruction", 64
  c.data.instruction_field, c.data.response_field = "instruction", "response"
  c.fl.num_clients, c.fl.local_steps, c.fl.executor = 2, 2, "vmap"
  c.lora.rank, c.lora.targets = 4, (r"(q|v)_proj$",)
  c.optim.batch_size = 4
  return c


def test_remat_shrinks_saved_activations_and_bf16_halves_them():
  none = memory_plan.saved_activations(_config("none"), SHAPE)
  block = memory_plan.saved_activations(_config("block"), SHAPE)
  assert block < none / 2
  bf16 = _config("none", "bfloat16")
  bf16.model.dtype = "bfloat16"
  # counted in their own dtype, not upcast (HF Llama keeps its bf16 attention probabilities float32: not half)
  assert memory_plan.saved_activations(bf16, SHAPE) < 0.9 * none


def test_estimate_agrees_with_xla_plan_without_remat():
  config = _config("none")
  estimate = memory_plan.estimate(config, SHAPE)
  programs = memory_plan.round_programs(config, SHAPE, 1)
  assert estimate["base_bytes"] == programs["base"]
  xla_peak = programs["client_update"].peak
  jaxpr_peak = estimate["fixed_bytes"] + estimate["per_client_bytes"]
  assert 0.5 * xla_peak < jaxpr_peak < 2.0 * xla_peak, (jaxpr_peak, xla_peak)
  server = programs["server_step"]
  assert server.aliased >= programs["state"] * 0.9  # the in-place server step reuses the state's buffers


def test_lm_memory_benchmark_runs_at_a_tiny_shape():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "lm_memory.py"), "--hidden", "64", "--layers", "2",
         "--heads", "4", "--kv_heads", "2", "--intermediate", "128", "--vocab", "512", "--seq", "32", "--bs", "2",
         "--steps", "2", "--rank", "4", "--remat", "block", "--measure"]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["estimate"]["saved_activation_bytes"] < out["estimate"]["saved_without_remat_bytes"]
  assert out["xla_plan"]["client_update"]["peak"] > out["estimate"]["base_bytes"]
  assert out["measured"]["peak_rss_bytes"] > 0


def _plan_cli(tmp_path, *extra):
  SHAPE.save_pretrained(tmp_path / "shape")
  cmd = [sys.executable, "-m", "frlora_jax.plan", f"--config={ROOT}/configs/metamathqa.py",
         f"--model_config={tmp_path / 'shape'}", "--config.data.max_length=64", "--config.optim.batch_size=4",
         "--config.model.param_dtype=float32", "--config.model.dtype=float32", *extra]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_plan_cli_picks_the_largest_chunk_that_fits(tmp_path):
  result = _plan_cli(tmp_path, "--device_memory=40GB")
  assert result.returncode == 0, result.stderr[-2000:]
  plan = json.loads(result.stdout.strip().splitlines()[-1])
  assert plan["clients_per_chunk"] == plan["config_clients_per_round"] == 2  # a tiny model: every client fits
  assert plan["device_memory_bytes"] == 40 * 10 ** 9 and plan["margin_bytes"] > 0
  # Memory for the state and exactly one client, plus half of another: one client per chunk.
  one = plan["fixed_bytes"] + plan["per_client_bytes"] * 1.5
  result = _plan_cli(tmp_path, f"--device_memory={int(one)}", "--memory_fraction=1.0")
  assert json.loads(result.stdout.strip().splitlines()[-1])["clients_per_chunk"] == 1


def test_plan_cli_says_by_how_much_a_config_does_not_fit(tmp_path):
  result = _plan_cli(tmp_path, "--device_memory=1MB")
  assert result.returncode == 0, result.stderr[-2000:]
  plan = json.loads(result.stdout.strip().splitlines()[-1])
  assert plan["clients_per_chunk"] == 0 and plan["shortfall_bytes"] > 0
  assert "does not fit" in result.stdout and "remat" in result.stdout


def test_plan_cli_refuses_a_bad_size(tmp_path):
  result = _plan_cli(tmp_path, "--device_memory=forty")
  assert result.returncode != 0 and "--device_memory='forty'" in result.stderr


def _limit(monkeypatch, make_config, clients_fitting: float):
  """Pretend the device holds the run state and `clients_fitting` clients."""
  from frlora_jax import plan
  config = make_config()
  estimate = memory_plan.estimate(config, plan.model_config(config, None))
  limit = estimate["fixed_bytes"] + clients_fitting * estimate["per_client_bytes"]
  monkeypatch.setattr(plan, "device_limit", lambda: (int(limit), 1.0, "a test device"))


def test_auto_chunking_equals_all_clients_at_once(make_config, monkeypatch):
  from frlora_jax import experiment
  overrides = {"fl.executor": "vmap", "fl.num_clients": 3}
  whole = experiment.build(make_config(**overrides, **{"fl.clients_per_chunk": 0}))
  _limit(monkeypatch, make_config, 1.5)
  assert experiment.clients_per_chunk(make_config(**overrides), None) == 1
  chunked = experiment.build(make_config(**overrides))
  _, expected = experiment.run_round(whole, whole.init_state(), 0)
  _, got = experiment.run_round(chunked, chunked.init_state(), 0)
  assert got["client_losses"] == expected["client_losses"]


def test_a_config_too_big_for_the_device_stops_before_loading_data(make_config, monkeypatch):
  import pytest
  from frlora_jax import experiment
  _limit(monkeypatch, make_config, 0.5)
  with pytest.raises(ValueError, match=r"not even one client fits: .* GB more .* config.model.remat=block"):
    experiment.build(make_config(**{"data.path": "/nonexistent/data.csv", "fl.executor": "vmap"}))


def test_round_time_benchmark_runs_the_causal_lm_path_at_a_tiny_shape():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "round_time.py"), "--arch", "llama", "--hidden", "64",
         "--layers", "2", "--heads", "4", "--kv_heads", "2", "--intermediate", "128", "--vocab", "512", "--seq", "32",
         "--bs", "2", "--clients", "2", "--steps", "2", "--rounds", "2", "--rank", "4", "--grad_accum", "2"]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["arch"] == "llama" and out["compiles_after_first_round"] == 0
  assert out["tokens_per_s"] > 0 and out["round_gflop"] > 0 and out["peak_rss_mb"] > 0


def test_scanned_layers_save_no_more_than_the_unrolled_loop():
  """Scanning must not make the backward pass keep a copy of every layer's weights (lax.switch outputs):
  at this shape (short rows, wide layers) those copies would be most of what is saved."""
  wide = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  for remat in ("none", "block"):
    config = _config(remat)
    config.data.max_length, config.optim.batch_size = 16, 1
    unrolled = memory_plan.saved_activations(config, wide)
    config.model.scan_layers = True
    # q_proj [256 -> 256] and v_proj [256 -> 128] at rank 4 in 3 layers: the stacked factors the scan reads
    stacked_lora = 3 * 4 * 4 * ((256 + 256) + (256 + 128))
    assert memory_plan.saved_activations(config, wide) <= 1.02 * unrolled + stacked_lora, remat  # (7x with copies)
