"""A llama.cpp GGUF file -> a Hugging Face Flax Llama directory (config, weights, tokenizer).

Quantized tensors are dequantized with the `gguf` package. Two layout traps:
GGUF stores every matrix as PyTorch's [out, in] (Flax kernels are [in, out]),
and llama.cpp permutes the rows of q/k projections per head for its rotary
kernel, which `unpermute_rows` undoes. The tokenizer is rebuilt from the GGUF
vocabulary, merges and chat template, so no hub download is needed. The
converted directory is cached next to the file's cache and written atomically.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# GGUF tensor name (inside blk.N) -> HF Llama module path inside model.layers.N
LAYER_TENSORS = {
    "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
LAYER_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
CONTROL_TOKEN_TYPES = (3, 4)  # llama.cpp token types CONTROL and USER_DEFINED: never split


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head rotary permutation of a [heads*head_dim, in] q/k matrix."""
  rows = weight.shape[0]
  return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's permutation (used by tests to check `unpermute_rows` is its inverse)."""
  rows = weight.shape[0]
  return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_config(reader) -> dict:
  """LlamaConfig kwargs from the GGUF metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' files convert to FlaxLlama.")
  get = lambda key, default=None: _field(reader, f"llama.{key}", default)
  tensor_names = {t.name for t in reader.tensors}
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  return dict(
      vocab_size=int(get("vocab_size", len(_field(reader, "tokenizer.ggml.tokens")))),
      hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(get("attention.head_count_kv", heads)),
      max_position_embeddings=int(get("context_length")), rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      tie_word_embeddings="output.weight" not in tensor_names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))


def read_weights(reader, config: dict) -> dict:
  """Flax params tree {model: {...}, lm_head: {...}} in float32."""
  from gguf.quants import dequantize
  heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
  params: dict = {"model": {"layers": {}}}
  for tensor in reader.tensors:
    w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    parts = tensor.name.split(".")
    if tensor.name == "token_embd.weight":
      params["model"]["embed_tokens"] = {"embedding": w}
    elif tensor.name == "output_norm.weight":
      params["model"]["norm"] = {"weight": w}
    elif tensor.name == "output.weight":
      params["lm_head"] = {"kernel": w.T}
    elif parts[0] == "blk" and parts[2] in LAYER_TENSORS:
      if parts[2] == "attn_q":
        w = unpermute_rows(w, heads)
      elif parts[2] == "attn_k":
        w = unpermute_rows(w, kv_heads)
      group, name = LAYER_TENSORS[parts[2]]
      params["model"]["layers"].setdefault(parts[1], {}).setdefault(group, {})[name] = {"kernel": np.ascontiguousarray(w.T)}
    elif parts[0] == "blk" and parts[2] in LAYER_NORMS:
      params["model"]["layers"].setdefault(parts[1], {})[LAYER_NORMS[parts[2]]] = {"weight": w}
    else:
      raise ValueError(f"GGUF tensor {tensor.name!r} has no place in a Llama model; is this a Llama GGUF?")
  if "lm_head" not in params:
    params["lm_head"] = {"kernel": np.ascontiguousarray(params["model"]["embed_tokens"]["embedding"].T)}
  return params


def read_tokenizer(reader):
  """A PreTrainedTokenizerFast from the GGUF BPE vocabulary, merges and chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is.")
  tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
  types = list(_field(reader, "tokenizer.ggml.token_type"))
  merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  # llama.cpp's "smollm"/"gpt2" pre-tokenizers: digits one by one (smollm), then GPT-2's byte-level regex.
  steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  if _field(reader, "tokenizer.ggml.pre") in ("smollm",):
    steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
  bpe.pre_tokenizer = pre_tokenizers.Sequence(steps)
  bpe.decoder = decoders.ByteLevel()
  bpe.post_processor = processors.ByteLevel(trim_offsets=False)
  special = [t for t, ty in zip(tokens, types) if int(ty) in CONTROL_TOKEN_TYPES]
  name_of = lambda key: tokens[int(_field(reader, key))] if _field(reader, key) is not None else None
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token=name_of("tokenizer.ggml.bos_token_id"),
      eos_token=name_of("tokenizer.ggml.eos_token_id"), unk_token=name_of("tokenizer.ggml.unknown_token_id"),
      pad_token=name_of("tokenizer.ggml.padding_token_id"), additional_special_tokens=special,
      chat_template=_field(reader, "tokenizer.chat_template"), clean_up_tokenization_spaces=False)
  return tokenizer


def _fingerprint(path: Path) -> str:
  stat = path.stat()
  return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def convert(gguf_path: str | os.PathLike, out_root: str | os.PathLike | None = None) -> Path:
  """The HF Flax directory for a GGUF file, converting it on first use (atomic)."""
  import gguf
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  path = Path(gguf_path)
  if not path.is_file():
    raise FileNotFoundError(f"config.model.name: GGUF file {str(path)!r} does not exist.")
  if out_root is None:
    from frlora_jax import assets
    out_root = assets.cache_dir() / "converted"
  target = Path(out_root) / f"{path.stem}-{_fingerprint(path)}"
  if (target / "config.json").exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  reader = gguf.GGUFReader(str(path))
  config = LlamaConfig(**read_config(reader))
  params = read_weights(reader, config.to_dict())
  tokenizer = read_tokenizer(reader)
  tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
  try:
    model = FlaxLlamaForCausalLM(config, _do_init=False)
    model.save_pretrained(tmp, params=params)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "config.json").exists():
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target
