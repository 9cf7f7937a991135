"""Llama's decoder layers run as one `lax.scan` instead of HF's unrolled Python loop.

Why: XLA compiles an unrolled 30-layer train step as 30 copies of the layer's code. On
XLA:CPU that program took ~80 s to compile at the SmolLM2-135M shape and its executable
stayed ~0.9 GB resident; scanned, one layer body is compiled once.

How, without editing transformers or changing the parameter tree: while `scanned(family)`
is active, `FlaxLlamaLayerCollection` in the HF module's namespace is swapped (as
causal_lm.model_fixes and remat.blocks_rematted do) for a subclass whose call scans over the
layer index. Each step picks its layer's parameters from the HF tree with `lax.switch`, so
the base keeps its per-layer paths (LoRA targets, PiSSA, checkpoints and exports see the same
tree) and is never stacked into a second copy; the layer's LoRA factors (and the dropout seeds
their full paths give) are stacked, which is small, and reach the interceptor through
`lora.layer_factors`. Block remat (remat.py) becomes the scanned layer's checkpoint policy.
Decoding with a KV cache, attention dropout, and requests for per-layer outputs take HF's own loop.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from frlora_jax import lora as lora_lib

FAMILIES = ("llama",)


@functools.lru_cache(maxsize=None)
def scanned_collection(collection_cls):
  """A subclass of FlaxLlamaLayerCollection whose call is a scan over its layers."""
  from transformers.models.llama import modeling_flax_llama as lib

  class Scanned(collection_cls):
    def __call__(self, hidden_states, attention_mask=None, position_ids=None, deterministic: bool = True,
                 init_cache: bool = False, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = False):
      count = self.config.num_hidden_layers
      dropout_on = not deterministic and self.config.attention_dropout > 0.0
      hf_loop = (init_cache or output_attentions or output_hidden_states or dropout_on or self.is_initializing()
                 or "cache" in self.variables or "params" not in self.variables)
      # None also when LoRA sits on only some layers, or with unequal shapes: HF's loop then too
      lora_per_layer = None if hf_loop else lora_lib.stack_layer_factors(tuple(self.scope.path), count)
      if lora_per_layer is None:
        return super().__call__(hidden_states, attention_mask, position_ids, deterministic, init_cache,
                                output_attentions, output_hidden_states, return_dict)
      params = self.variables["params"]
      layers = [params[str(i)] for i in range(count)]
      layer_cls, policy = layer_and_policy(lib.FlaxLlamaDecoderLayer)  # looked up now: block remat swaps it
      config, dtype = self.config, self.dtype

      def layer(hidden, xs):
        index, factors = xs
        layer_params = jax.lax.switch(index, [functools.partial(lambda i: layers[i], i) for i in range(count)])
        with lora_lib.layer_factors(factors):
          out = layer_cls(config, dtype=dtype, parent=None).apply(
              {"params": layer_params}, hidden, attention_mask, position_ids, deterministic)
        return out[0], None

      layer = jax.checkpoint(layer, policy=policy, prevent_cse=True)
      hidden_states, _ = jax.lax.scan(layer, hidden_states, (jnp.arange(count), lora_per_layer))
      return hidden_states, None, None

  Scanned.__name__ = Scanned.__qualname__ = collection_cls.__name__
  return Scanned


def layer_and_policy(layer_cls):
  """(the layer class to apply, the checkpoint policy of one scanned layer).

  The policy is the block remat's (remat.rematted_block; 'block' saves nothing), or, without
  remat, everything, except in both cases the output of the `lax.switch` (a `cond`) that picks
  the layer's weights: the backward pass picks them again instead of saving a copy of every layer.
  """
  inner = jax.checkpoint_policies.everything_saveable
  if hasattr(layer_cls, "unrematted"):
    layer_cls, inner = layer_cls.unrematted, layer_cls.remat_policy or jax.checkpoint_policies.nothing_saveable
  return layer_cls, lambda prim, *args, **params: prim.name != "cond" and inner(prim, *args, **params)


@contextlib.contextmanager
def scanned(family: str, enabled: bool = True):
  """While active, the family's layer collection (built by Flax setup) scans over its layers."""
  if not enabled or family not in FAMILIES:
    yield
    return
  from transformers.models.llama import modeling_flax_llama as lib
  original = lib.FlaxLlamaLayerCollection
  lib.FlaxLlamaLayerCollection = scanned_collection(original)
  try:
    yield
  finally:
    lib.FlaxLlamaLayerCollection = original


def check(family: str, enabled: bool) -> None:
  if enabled and family not in FAMILIES:
    raise ValueError(f"config.model.scan_layers=True is implemented for {FAMILIES} models, not {family!r}; "
                     f"set config.model.scan_layers=False.")
