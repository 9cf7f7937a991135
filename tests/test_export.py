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
  w0 = np.asarray(lora.get_kernel(exp.model.params, path))
  rebuilt = w0 + scale * (b_t @ a_t).T  # PEFT: W x + s * B(A x), torch weights are [out, in]
  error = summary["targets"]["/".join(path)]["relative_error"]
  if algorithm == "fedavg":  # a rank-r update: the adapter is exact
    np.testing.assert_allclose(rebuilt, np.asarray(lora.get_kernel(params, path)), atol=1e-5)
    assert error < 1e-4
  else:  # FRLoRA's accumulated update has rank > r: the adapter is an approximation, and says so
    assert summary["targets"]["/".join(path)]["delta_rank"] > config.lora.rank
    assert 0 < error < 1
  assert "base_model.model.classifier.weight" in adapter
