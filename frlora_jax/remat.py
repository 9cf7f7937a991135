"""Rematerialisation of transformer blocks for every supported family, without editing transformers.

`config.model.remat`:
- 'none': activations of every block are kept for the backward pass (the default);
- 'block': each transformer block is recomputed in the backward pass from its input, so
  only block inputs are stored (what HF's gradient_checkpointing does for BERT);
- 'full': the whole forward pass is recomputed (only the inputs are stored);
- a `jax.checkpoint_policies` name (e.g. 'dots_saveable', 'dots_with_no_batch_dims_saveable'):
  per block, keep what the policy saves and recompute the rest.

Blocks are rematted the way causal_lm.model_fixes patches Llama/GPT-2: while a model is
applied, the block class in the HF module's namespace is swapped for a subclass whose call
runs under Flax's lifted `nn.remat`. The subclass keeps the parameter tree and module paths
(LoRA interception still finds its targets); Python arguments (flags like `deterministic`)
stay static, only arrays are traced.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from typing import Callable, Optional

import flax.linen as nn
import jax

# family -> (module holding the block class, block class name)
BLOCKS = {
    "bert": ("transformers.models.bert.modeling_flax_bert", "FlaxBertLayer"),
    "roberta": ("transformers.models.roberta.modeling_flax_roberta", "FlaxRobertaLayer"),
    "llama": ("transformers.models.llama.modeling_flax_llama", "FlaxLlamaDecoderLayer"),
    "gpt2": ("transformers.models.gpt2.modeling_flax_gpt2", "FlaxGPT2Block"),
}
MODES = ("none", "block", "full")


def policy_names() -> tuple[str, ...]:
  """The jax.checkpoint_policies that are policies themselves (not factories taking names)."""
  names = []
  for name in dir(jax.checkpoint_policies):
    value = getattr(jax.checkpoint_policies, name)
    if not name.startswith("_") and callable(value) and "save_" not in name and "offload" not in name:
      names.append(name)
  return tuple(sorted(names))


def check(value: str) -> None:
  if value not in MODES and value not in policy_names():
    raise ValueError(f"config.model.remat={value!r} is unknown; use one of {', '.join(MODES)} or a "
                     f"jax.checkpoint_policies name ({', '.join(policy_names())}).")


def _is_traced(value) -> bool:
  return any(isinstance(leaf, jax.Array) or hasattr(leaf, "shape") for leaf in jax.tree_util.tree_leaves(value))


@functools.lru_cache(maxsize=None)
def rematted_block(block_cls, policy: Optional[Callable]):
  """A subclass of `block_cls` whose __call__ is recomputed in the backward pass."""
  signature = inspect.signature(block_cls.__call__)

  class Rematted(block_cls):
    def __call__(self, *args, **kwargs):
      bound = signature.bind(self, *args, **kwargs)
      bound.apply_defaults()
      named = dict(bound.arguments)
      del named["self"]
      traced = [name for name, value in named.items() if _is_traced(value)]
      static = {name: value for name, value in named.items() if name not in traced}

      def body(module, *values):
        return block_cls.__call__(module, **static, **dict(zip(traced, values)))

      return nn.remat(body, policy=policy, prevent_cse=True)(self, *(named[name] for name in traced))

  Rematted.__name__ = Rematted.__qualname__ = block_cls.__name__
  Rematted.unrematted, Rematted.remat_policy = block_cls, policy  # what a scanned stack (scan_layers.py) applies
  return Rematted


@contextlib.contextmanager
def blocks_rematted(family: str, mode: str):
  """While active, the family's transformer blocks built by Flax setup are rematted per `mode`."""
  if mode in ("none", "full") or family not in BLOCKS:
    yield
    return
  module_name, class_name = BLOCKS[family]
  lib = importlib.import_module(module_name)
  original = getattr(lib, class_name)
  policy = None if mode == "block" else getattr(jax.checkpoint_policies, mode)
  setattr(lib, class_name, rematted_block(original, policy))
  try:
    yield
  finally:
    setattr(lib, class_name, original)


def with_remat(apply_fn: Callable, family: str, mode: str) -> Callable:
  """`apply_fn(params, batch, rng, deterministic)` with the model's blocks (or all of it) rematted."""
  check(mode)
  if mode == "none":
    return apply_fn
  def apply(params, batch, rng=None, deterministic=True):
    if mode == "full":
      return jax.checkpoint(functools.partial(apply_fn, deterministic=deterministic))(params, batch, rng)
    with blocks_rematted(family, mode):
      return apply_fn(params, batch, rng, deterministic)

  return apply
