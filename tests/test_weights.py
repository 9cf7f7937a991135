"""Storage dtype at load, and PyTorch safetensors checkpoints streamed without torch or a second copy."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from conftest import ROOT, byte_tokenizer
from frlora_jax import causal_lm, experiment, models, weights


def torch_state_dict(flax_params) -> dict:
  """A Flax tree under PyTorch's names and layouts (Linear weight [out, in], LayerNorm weight/bias)."""
  out = {}
  for key, value in traverse_util.flatten_dict(flax_params).items():
    value = np.asarray(value, np.float32)
    if key[-1] == "kernel":
      key, value = key[:-1] + ("weight",), value.T
    elif key[-1] in ("embedding", "scale"):
      key = key[:-1] + ("weight",)
    out[".".join(key)] = np.ascontiguousarray(value)
  return out


def save_as_pytorch(folder, hf_config, flax_params, tokenizer=None):
  os.makedirs(folder, exist_ok=True)
  hf_config.save_pretrained(folder)
  safetensors.numpy.save_file(torch_state_dict(flax_params), os.path.join(folder, "model.safetensors"),
                              metadata={"format": "pt"})  # as PyTorch save_pretrained writes it
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
  return str(folder)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_from_pytorch_safetensors(tmp_path, arch):
  model = causal_lm.random_causal_lm(arch, hidden=32, layers=2, heads=4, vocab=260, max_positions=64)
  hf_params = causal_lm.to_hf_layout(arch, model.params)
  folder = save_as_pytorch(tmp_path / arch, model.hf_config, hf_params, byte_tokenizer())
  assert not os.path.exists(os.path.join(folder, "flax_model.msgpack"))
  for dtype in (jnp.float32, jnp.bfloat16):
    loaded = causal_lm.load_causal_lm(folder, param_dtype=dtype)
    expected, got = traverse_util.flatten_dict(model.params), traverse_util.flatten_dict(loaded.params)
    assert set(got) == set(expected)
    for key, value in expected.items():
      assert got[key].dtype == dtype, key
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(jnp.asarray(value, dtype)), err_msg=str(key))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_classifier_from_pytorch_safetensors_keeps_the_head_float32(tmp_path, arch, tiny_model_dir):
  model = models.random_classifier(arch, hidden=32, layers=2, heads=2, vocab=40, max_positions=40, intermediate=64)
  base = {k: v for k, v in model.params.items() if k != "classifier"}  # a pre-trained encoder: no head
  from transformers import AutoTokenizer
  folder = save_as_pytorch(tmp_path / arch, model.hf_config, base, AutoTokenizer.from_pretrained(tiny_model_dir))
  loaded = models.load_classifier(folder, num_labels=2, param_dtype=jnp.bfloat16)
  got = traverse_util.flatten_dict(loaded.params)
  assert set(got) == set(traverse_util.flatten_dict(model.params))
  for key, value in traverse_util.flatten_dict(base).items():
    assert got[key].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(jnp.asarray(value, jnp.bfloat16)))
  assert {str(v.dtype) for k, v in got.items() if k[0] == "classifier"} == {"float32"}  # fresh head, float32


def test_bf16_storage_in_a_run(make_config, make_lm_config):
  """param_dtype reaches the base; FRLoRA's targets stay float32 masters; LoRA and head float32."""
  for config in (make_config(**{"model.param_dtype": "bfloat16"}),
                 make_lm_config(**{"model.param_dtype": "bfloat16", "fl.algorithm": "fedavg"})):
    exp = experiment.build(config)
    state, record = experiment.run_round(exp, exp.init_state(), 0)
    assert np.isfinite(record["train_loss"])
    targets = {tuple(p) for p in experiment.lora_lib.lora_entries(state.server.lora)}
    for key, value in traverse_util.flatten_dict(state.server.base).items():
      updated_target = key[:-1] in targets and key[-1] == "kernel" and exp.algorithm.updates_base
      assert value.dtype == (jnp.float32 if updated_target else jnp.bfloat16), key
    for tree in (state.server.lora, state.server.head):
      assert {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)} <= {"float32"}


PEAK = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from frlora_jax import causal_lm
def hwm():
  return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
warm = causal_lm.load_causal_lm(sys.argv[2], param_dtype=jnp.bfloat16)  # imports, tokenizer, runtime: not counted
jax.block_until_ready(warm.params)
del warm
before = hwm()
model = causal_lm.load_causal_lm(sys.argv[1], param_dtype=jnp.bfloat16)
jax.block_until_ready(model.params)
print(json.dumps({"before": before, "after": hwm()}))
"""


def test_streamed_load_holds_no_second_copy(tmp_path):
  """A ~200 MB float32 checkpoint loaded as bf16: the peak grows by far less than the file's size.

  HF's from_pretrained would hold the whole float32 state dict plus the converted tree
  (>= 2x the file); streaming holds the bf16 tree (0.5x) plus one tensor at a time."""
  hf_config = causal_lm.random_causal_lm("llama", hidden=512, layers=1, heads=8, vocab=100,
                                         max_positions=256).hf_config  # HF's rotary needs >= 2 * head_dim
  hf_config.num_hidden_layers, hf_config.vocab_size, hf_config.intermediate_size = 16, 8000, 1536
  from transformers import FlaxLlamaForCausalLM
  shapes = traverse_util.flatten_dict(jax.eval_shape(
      lambda: FlaxLlamaForCausalLM(hf_config, _do_init=False).init_weights(jax.random.PRNGKey(0), (1, 1))))
  rng = np.random.default_rng(0)
  fake = traverse_util.unflatten_dict({k: rng.standard_normal(v.shape, np.float32) * 0.02 for k, v in shapes.items()})
  folder = save_as_pytorch(tmp_path / "mid", hf_config, fake, byte_tokenizer())
  del fake
  size = os.path.getsize(os.path.join(folder, "model.safetensors"))
  assert size > 200e6
  tiny = causal_lm.random_causal_lm("llama", hidden=32, layers=1, heads=4, vocab=260, max_positions=64)
  warmup = save_as_pytorch(tmp_path / "tiny", tiny.hf_config, tiny.params, byte_tokenizer())
  result = subprocess.run([sys.executable, "-c", PEAK, folder, warmup], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  memory = json.loads(result.stdout.strip().splitlines()[-1])
  growth = memory["after"] - memory["before"]
  print(f"peak grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB float32 checkpoint")
  assert growth < 0.85 * size, f"peak grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_unknown_param_dtype_is_refused(make_config):
  with pytest.raises(ValueError, match=r"config.model.param_dtype='int8' is unknown; use one of float32, bfloat16"):
    experiment.build(make_config(**{"model.param_dtype": "int8"}))
  assert weights.dtype_of("float16") == jnp.float16


def test_flax_checkpoint_without_a_head_gets_a_fresh_float32_one(tmp_path, tiny_model_dir):
  """A Flax msgpack encoder checkpoint (no classifier) loads with a random head, as from_pretrained did."""
  from transformers import FlaxBertModel
  model = models.random_classifier("bert", hidden=32, layers=2, heads=2, vocab=40, max_positions=40, intermediate=64)
  encoder = FlaxBertModel(model.hf_config, _do_init=False)
  encoder.save_pretrained(tmp_path / "encoder", params=model.params["bert"])
  model.hf_config.save_pretrained(tmp_path / "encoder")
  from transformers import AutoTokenizer
  AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "encoder")
  loaded = models.load_classifier(str(tmp_path / "encoder"), num_labels=3, param_dtype=jnp.bfloat16)
  assert loaded.params["classifier"]["kernel"].shape == (32, 3)
  assert loaded.params["classifier"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(loaded.params["bert"]["pooler"]["dense"]["kernel"]),
                                np.asarray(jnp.asarray(model.params["bert"]["pooler"]["dense"]["kernel"], jnp.bfloat16)))
