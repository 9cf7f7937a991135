"""Export a run's global model: a merged HF Flax model dir, and a PEFT-style LoRA adapter.

  python -m frlora_jax.export --workdir runs/demo --out exported/demo

- `<out>/merged/`: `save_pretrained` of the merged model plus its tokenizer; loads back
  with `FlaxAutoModelForSequenceClassification.from_pretrained` (classifiers) or
  `FlaxAutoModelForCausalLM.from_pretrained` (instruction-tuned causal LMs) and gives the
  run's logits. This is the exact export for every algorithm.
- `<out>/adapter/`: `adapter_config.json` + `adapter_model.safetensors` in PEFT's PyTorch
  layout (lora_A [r, in], lora_B [out, r], head under modules_to_save; task_type SEQ_CLS or
  CAUSAL_LM). Its update is the
  rank-r truncated SVD of (global weight - pre-trained weight) for each target. For
  FedAvg/FFA-LoRA that update has rank <= r and the adapter is exact; FRLoRA accumulates
  one rank-r update per round, so its update is full-rank in general and the adapter is
  an approximation: `export_report.json` gives its relative error per target. Use the
  merged model when that error matters.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

from frlora_jax import causal_lm, checkpoint, lora as lora_lib, models, workloads


def torch_name(path: tuple) -> str:
  return ".".join(path)


def export(workdir: str, out: str, step: int | None = None) -> dict:
  """Write `<out>/merged`, `<out>/adapter` and `<out>/export_report.json` for a run's global model."""
  base, lora_tree, head, config = checkpoint.restore_parts(workdir, step)
  merged = lora_lib.join_trees(lora_lib.merge(base, lora_tree, lora_lib.scale(config.lora)), head)
  merged_dir = os.path.join(out, "merged")
  if config.data.kind == "instruction":
    pretrained, task_type, fan_in_fan_out = _save_causal_lm(config, merged, merged_dir)
  else:
    pretrained, task_type, fan_in_fan_out = _save_classifier(config, merged, merged_dir)
  summary = write_adapter(config, lora_tree, head, merged, pretrained, os.path.join(out, "adapter"), task_type,
                          fan_in_fan_out)
  summary = {"algorithm": config.fl.algorithm, "merged": merged_dir, **summary}
  with open(os.path.join(out, "export_report.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _save_classifier(config, merged, merged_dir):
  """save_pretrained of the merged classifier and its tokenizer; (pre-trained params, PEFT task, fan_in_fan_out)."""
  from transformers import AutoConfig, FlaxAutoModelForSequenceClassification
  source = models.resolve_model_dir(config.model.name)
  classifier = merged["classifier"]
  num_labels = int(np.shape(classifier.get("kernel", classifier.get("out_proj", {}).get("kernel")))[-1])
  hf_config = AutoConfig.from_pretrained(source, num_labels=num_labels)
  label_names = list(config.data.label_names) or [str(i) for i in range(num_labels)]
  hf_config.id2label = dict(enumerate(label_names))
  hf_config.label2id = {name: i for i, name in enumerate(label_names)}
  model = FlaxAutoModelForSequenceClassification.from_pretrained(source, config=hf_config)
  pretrained = model.params  # W0: what the adapter's update is relative to
  model.params = jax_to_numpy(merged)
  model.save_pretrained(merged_dir)
  models.load_tokenizer(config.model.name).save_pretrained(merged_dir)
  return pretrained, "SEQ_CLS", False


def _save_causal_lm(config, merged, merged_dir):
  """save_pretrained of the merged causal LM (HF Flax layout) and its tokenizer."""
  from transformers import FlaxAutoModelForCausalLM
  model = causal_lm.load_causal_lm(config.model.name, separate_head=workloads.targets_lm_head(config))
  hf_model = FlaxAutoModelForCausalLM.from_config(model.hf_config, _do_init=False)
  hf_params = causal_lm.tie_lm_head(model.family, model.hf_config, causal_lm.to_hf_layout(model.family, merged))
  hf_model.save_pretrained(merged_dir, params=jax_to_numpy(hf_params))  # FlaxLlama needs its lm_head copy
  model.tokenizer.save_pretrained(merged_dir)
  return model.params, "CAUSAL_LM", model.family == "gpt2"  # GPT-2's Conv1D stores [in, out]


def write_adapter(config, lora_tree, head, merged, pretrained, adapter_dir: str, task_type: str,
                  fan_in_fan_out: bool) -> dict:
  """A PEFT LoRA adapter: per target the rank-r SVD of (merged - pre-trained); the head under modules_to_save."""
  import safetensors.numpy
  scale, rank = lora_lib.scale(config.lora), config.lora.rank
  tensors, report = {}, {}
  for path in lora_lib.lora_entries(lora_tree):
    w0 = np.asarray(lora_lib.get_kernel(pretrained, path), np.float64)
    delta = np.asarray(lora_lib.get_kernel(merged, path), np.float64) - w0
    a, b = (np.asarray(x, np.float64) for x in lora_lib.pissa_factors(delta, rank, scale))  # best rank-r of delta
    name = f"base_model.model.{torch_name(path)}"
    # PyTorch layout: lora_A [r, in], lora_B [out, r] (also for GPT-2's Conv1D, with fan_in_fan_out).
    # safetensors writes the raw buffer, so transposed views must be made contiguous first.
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    error = np.linalg.norm(delta - scale * a @ b) / max(np.linalg.norm(delta), 1e-30)
    report[lora_lib.path_str(path)] = {"relative_error": float(error),
                                       "delta_rank": int(np.linalg.matrix_rank(delta.astype(np.float32)))}
  for key, leaf in _flat(head).items():
    torch_key = torch_name(key[:-1]) + (".weight" if key[-1] == "kernel" else ".bias")
    value = np.asarray(leaf, np.float32)
    tensors[f"base_model.model.{torch_key}"] = np.ascontiguousarray(value.T if key[-1] == "kernel" else value)
  os.makedirs(adapter_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"))
  adapter_config = {
      "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": config.lora.alpha,
      "lora_dropout": config.lora.dropout, "target_modules": sorted({p[-1] for p in lora_lib.lora_entries(lora_tree)}),
      "base_model_name_or_path": config.model.name, "modules_to_save": sorted({k[0] for k in _flat(head)}) or None,
      "bias": "none", "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
  }
  with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
    json.dump(adapter_config, f, indent=2)
  return {"adapter": adapter_dir, "adapter_max_relative_error": max(r["relative_error"] for r in report.values()),
          "targets": report}


def _flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(tree)


def jax_to_numpy(tree):
  import jax
  return jax.tree_util.tree_map(np.asarray, tree)


def cli():
  """The command line (flags are defined here, not at import, so the module is importable)."""
  workdir = flags.DEFINE_string("workdir", None, "A run's workdir (with checkpoints/).")
  out = flags.DEFINE_string("out", None, "Output folder.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if not workdir.value or not out.value:
      raise app.UsageError("--workdir and --out are required.")
    summary = export(workdir.value, out.value, step.value)
    print(json.dumps({k: v for k, v in summary.items() if k != "targets"}, indent=2))

  app.run(main)


if __name__ == "__main__":
  cli()
