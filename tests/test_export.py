"""Export: the merged HF model loads back with the run's logits; the adapter uses PEFT's layout."""
import json

import numpy as np
import pytest
import safetensors.numpy

from frlora_jax import checkpoint, experiment, export, lora, models


@pytest.mark.parametrize("algorithm", ["frlora", "fedavg"])
def test_export_round_trip(make_config, tmp_path, algorithm):
  config = make_config(**{"fl.rounds": 2, "fl.algorithm": algorithm})
  experiment.run(config, str(tmp_path / "run"))
  summary = export.export(str(tmp_path / "run"), str(tmp_path / "out"))

  from transformers import FlaxAutoModelForSequenceClassification
  reloaded = FlaxAutoModelForSequenceClassification.from_pretrained(summary["merged"])
  params, _ = checkpoint.restore(str(tmp_path / "run"))
  exp = experiment.build(config)
  batch = {k: v for k, v in exp.data.eval_batches[0].items() if k != "valid"}
  apply = models.make_apply(exp.model)
  np.testing.assert_array_equal(np.asarray(apply(reloaded.params, batch)), np.asarray(apply(params, batch)))

  # adapter in PyTorch layout: W0 + s * B^T... reproduces the exported update
  adapter = safetensors.numpy.load_file(f"{summary['adapter']}/adapter_model.safetensors")
  adapter_config = json.load(open(f"{summary['adapter']}/adapter_config.json"))
  assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == config.lora.rank
  assert adapter_config["target_modules"] == ["query", "value"]
  scale = adapter_config["lora_alpha"] / adapter_config["r"]
  path = ("bert", "encoder", "layer", "0", "attention", "self", "value")
  a_t = adapter["base_model.model.bert.encoder.layer.0.attention.self.value.lora_A.weight"]
  b_t = adapter["base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.weight"]
  assert a_t.shape == (config.lora.rank, 32) and b_t.shape == (32, config.lora.rank)
  w0 = np.asarray(lora.get_kernel(models.load_classifier(config.model.name, exp.data.num_labels).params, path))
  rebuilt = w0 + scale * (b_t @ a_t).T  # PEFT: W x + s * B(A x), torch weights are [out, in]
  error = summary["targets"]["/".join(path)]["relative_error"]
  if algorithm == "fedavg":  # a rank-r update: the adapter is exact
    np.testing.assert_allclose(rebuilt, np.asarray(lora.get_kernel(params, path)), atol=1e-5)
    assert error < 1e-4
  else:  # FRLoRA's accumulated update has rank > r: the adapter is an approximation, and says so
    assert summary["targets"]["/".join(path)]["delta_rank"] > config.lora.rank
    assert 0 < error < 1
  assert "base_model.model.classifier.weight" in adapter


@pytest.mark.parametrize("arch, algorithm", [("llama", "frlora"), ("llama", "fedavg"), ("gpt2", "fedavg")])
def test_export_causal_lm_round_trip(make_lm_config, tmp_path, arch, algorithm):
  """A merged causal LM that FlaxAutoModelForCausalLM loads back with the run's logits, and a CAUSAL_LM adapter."""
  from conftest import write_tiny_lm
  from transformers import FlaxAutoModelForCausalLM
  from frlora_jax import causal_lm
  overrides = {"fl.rounds": 2, "fl.algorithm": algorithm, "fl.clients_per_round": 2}
  if arch == "gpt2":
    overrides["model.name"] = write_tiny_lm(tmp_path / "gpt2", "gpt2")
  config = make_lm_config(**overrides)
  experiment.run(config, str(tmp_path / "run"))
  summary = export.export(str(tmp_path / "run"), str(tmp_path / "out"))

  model = causal_lm.load_causal_lm(config.model.name)
  reloaded = FlaxAutoModelForCausalLM.from_pretrained(summary["merged"])
  params, _ = checkpoint.restore(str(tmp_path / "run"))
  ids = np.asarray(model.tokenizer(["Which says yes? A. no B. yes", "[B]"], padding="longest")["input_ids"])
  batch = {"input_ids": ids, "attention_mask": (ids != model.tokenizer.pad_token_id).astype(np.int32)}
  apply = causal_lm.make_apply(model)
  np.testing.assert_array_equal(np.asarray(apply(causal_lm.to_lora_layout(model.family, reloaded.params), batch)),
                                np.asarray(apply(params, batch)))
  assert not np.array_equal(np.asarray(apply(model.params, batch)), np.asarray(apply(params, batch)))  # it trained

  adapter = safetensors.numpy.load_file(f"{summary['adapter']}/adapter_model.safetensors")
  adapter_config = json.load(open(f"{summary['adapter']}/adapter_config.json"))
  assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["fan_in_fan_out"] == (arch == "gpt2")
  path = ("model", "layers", "0", "self_attn", "q_proj") if arch == "llama" else ("transformer", "h", "0", "attn",
                                                                                   "c_attn")
  name = "base_model.model." + ".".join(path)
  a_t, b_t = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
  w0, w = np.asarray(lora.get_kernel(model.params, path)), np.asarray(lora.get_kernel(params, path))
  assert a_t.shape == (config.lora.rank, w0.shape[0]) and b_t.shape == (w0.shape[1], config.lora.rank)
  rebuilt = w0 + adapter_config["lora_alpha"] / adapter_config["r"] * (b_t @ a_t).T
  error = summary["targets"]["/".join(path)]["relative_error"]
  if algorithm == "fedavg":
    np.testing.assert_allclose(rebuilt, w, atol=1e-5)
    assert error < 1e-4
  else:
    assert summary["targets"]["/".join(path)]["delta_rank"] > config.lora.rank and 0 < error < 1
