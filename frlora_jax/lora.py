"""LoRA as its own parameter tree beside the frozen base parameters.

The base tree keeps the model's own paths; the LoRA tree mirrors the paths of
the targeted modules, each holding {"a": [in, r], "b": [r, out]}. The forward
pass adds s * (x @ A) @ B to a targeted module's output through
`flax.linen.intercept_methods`, so no model code is edited and no weight is
copied per client.
"""
from __future__ import annotations

import contextlib
import re
import zlib
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from frlora_jax import dropout as dropout_lib

Path = tuple[str, ...]


def path_str(path: Path) -> str:
  return "/".join(path)


def find_targets(params, patterns: Sequence[str], exclude: Sequence[str] = ()) -> dict[Path, tuple[int, int]]:
  """Module paths whose 2-D `kernel` matches any regex in `patterns`.

  Returns {module path: (in_features, out_features)}, in the tree's order.
  """
  targets = {}
  for key, leaf in traverse_util.flatten_dict(params).items():
    if key[-1] != "kernel" or np.ndim(leaf) != 2:
      continue
    name = path_str(key[:-1])
    if any(re.search(p, name) for p in exclude):
      continue
    if any(re.search(p, name) for p in patterns):
      targets[key[:-1]] = tuple(int(d) for d in leaf.shape)
  return targets


def scale(lora_config) -> float:
  """The LoRA scale s = alpha / r of a `config.lora` section (the one place it is computed)."""
  return float(lora_config.alpha) / float(lora_config.rank)


def lora_entries(lora) -> dict[Path, dict]:
  """{module path: {"a": A, "b": B}} from a nested LoRA tree."""
  entries: dict[Path, dict] = {}
  for key, leaf in traverse_util.flatten_dict(lora).items():
    entries.setdefault(key[:-1], {})[key[-1]] = leaf
  return entries


def from_entries(entries: dict[Path, dict]):
  return traverse_util.unflatten_dict(
      {path + (name,): leaf for path, ab in entries.items() for name, leaf in ab.items()})


def map_targets(fn: Callable, *loras) -> dict[Path, Any]:
  """{path: fn(entry_1, ..., entry_n)} at every target of the first LoRA tree.

  Each entry is that tree's {"a": A, "b": B} dict at the path (stacked trees give
  stacked factors). The server rules are written per target with this.
  """
  per_tree = [lora_entries(tree) for tree in loras]
  return {path: fn(*(entries[path] for entries in per_tree)) for path in per_tree[0]}


def map_lora(fn: Callable, *loras):
  """Like `map_targets`, where `fn` returns a target's new {"a", "b"} (or part of it): a LoRA tree."""
  return from_entries(map_targets(fn, *loras))


def split_factors(lora, factor: str = "a"):
  """(the tree without `factor`, a tree of `factor` alone): e.g. the trained B's and the frozen A's."""
  flat = traverse_util.flatten_dict(lora)
  kept = {k: v for k, v in flat.items() if k[-1] != factor}
  taken = {k: v for k, v in flat.items() if k[-1] == factor}
  return traverse_util.unflatten_dict(kept), traverse_util.unflatten_dict(taken)


def get_kernel(params, path: Path):
  node = params
  for k in path:
    node = node[k]
  return node["kernel"]


def replace_kernels(params, kernels: dict[Path, jax.Array]):
  """A copy of `params` with the kernels at the given module paths replaced."""
  flat = traverse_util.flatten_dict(params)
  for path, kernel in kernels.items():
    flat[path + ("kernel",)] = kernel
  return traverse_util.unflatten_dict(flat)


def with_kernel_dtype(params, paths, dtype):
  """`params` with the kernels at `paths` cast to `dtype` (e.g. float32 masters of low-precision targets)."""
  return replace_kernels(params, {path: jnp.asarray(get_kernel(params, path), dtype) for path in paths})


def add_to_kernels(params, deltas: dict[Path, jax.Array]):
  """`params` with W + dW at every module path of `deltas`, summed in float32, stored in W's dtype."""
  kernels = {}
  for path, update in deltas.items():
    w = get_kernel(params, path)
    kernels[path] = (jnp.asarray(w, jnp.float32) + update).astype(w.dtype)
  return replace_kernels(params, kernels)


def init_kaiming(key, targets: dict[Path, tuple[int, int]], rank: int):
  """PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
  entries = {}
  for i, (path, (d_in, d_out)) in enumerate(targets.items()):
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, rank), jnp.float32, -bound, bound)
    entries[path] = {"a": a, "b": jnp.zeros((rank, d_out), jnp.float32)}
  return from_entries(entries)


def pissa_factors(kernel: jax.Array, rank: int, scale: float):
  """Principal factors of a [in, out] kernel: A0 [in, r], B0 [r, out], s*A0@B0 = rank-r SVD."""
  u, s, vt = jnp.linalg.svd(jnp.asarray(kernel, jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank] / scale)
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def factors_of_weighted_sum(a_k: jax.Array, b_k: jax.Array, weights: jax.Array, rank: int):
  """A [in, rank], B [rank, out] with A @ B = the rank-`rank` SVD of sum_k w_k A_k @ B_k, split evenly.

  Why not SVD the sum: it has rank <= K*r, so QR of the stacked factors leaves an SVD
  of a (K*r)x(K*r) matrix; the [in, out] sum is never formed (for an LLM, 160x160
  instead of 4096x4096 per target). a_k: [K, in, r]; b_k: [K, r, out]; weights: [K].
  """
  k, n_in, r = a_k.shape
  stacked_a = jnp.transpose(a_k * weights[:, None, None], (1, 0, 2)).reshape(n_in, k * r)
  stacked_b = b_k.reshape(k * r, -1)
  q_a, r_a = jnp.linalg.qr(stacked_a)
  q_b, r_b = jnp.linalg.qr(stacked_b.T)
  a_small, b_small = pissa_factors(r_a @ r_b.T, rank, 1.0)
  return q_a @ a_small, b_small @ q_b.T


def init_pissa(params, targets: dict[Path, tuple[int, int]], rank: int, scale: float):
  """PiSSA init: LoRA = top-r singular part of W0, base = residual W0 - s*A0@B0.

  Returns (lora, residual_params); the model's output is unchanged.
  """
  lora = from_entries({path: dict(zip("ab", pissa_factors(get_kernel(params, path), rank, scale)))
                       for path in targets})
  return lora, add_to_kernels(params, map_targets(lambda entry: -delta(entry, scale), lora))


def rank_of(lora) -> int:
  """The (padded) LoRA rank of a tree: the width of its A factors."""
  return next(iter(lora_entries(lora).values()))["a"].shape[1]


def product_squared_norm(entry) -> jax.Array:
  """||A B||_F^2 of one target as tr((A^T A)(B B^T)): two r x r products, no [in, out] matrix."""
  a, b = entry["a"].astype(jnp.float32), entry["b"].astype(jnp.float32)
  return jnp.sum((a.T @ a) * (b @ b.T))   # both factors symmetric


def delta(entry, scale: float):
  return scale * entry["a"] @ entry["b"]


def merge(params, lora, scale: float):
  """Base params with every LoRA update folded in: W + s*A@B."""
  return add_to_kernels(params, map_targets(lambda entry: delta(entry, scale), lora))


def _path_seed(path: Path) -> int:
  return zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF


# The LoRA trees of the interceptors now active (innermost last), and the per-layer factors a
# scanned layer stack (scan_layers.py) hands to them while it traces one layer's body.
_ACTIVE: list[dict] = []
_LAYER: list[dict] = []


def stack_layer_factors(prefix: Path, count: int):
  """Each active LoRA's factors under `prefix/<i>/...` for i < count, stacked over i, or None.

  Returns {interceptor id: {suffix path: {"a": [count, in, r], "b": [count, r, out], "seed":
  [count]}}} ({} when no interceptor is active); "seed" is the dropout seed of each layer's full
  path. None when the layers do not all carry the same targets of the same shapes.
  """
  stacks = {}
  for entries in _ACTIVE:
    stacked = _stack_layers(entries, prefix, count)
    if stacked is None:
      return None
    stacks[str(id(entries))] = stacked
  return stacks


def _stack_layers(entries: dict[Path, dict], prefix: Path, count: int):
  depth = len(prefix)
  by_suffix: dict[Path, dict[int, dict]] = {}
  for path, entry in entries.items():
    if path[:depth] == prefix and len(path) > depth + 1 and path[depth].isdigit():
      by_suffix.setdefault(path[depth + 1:], {})[int(path[depth])] = entry
  stacked = {}
  for suffix, layers in by_suffix.items():
    if sorted(layers) != list(range(count)) or len({(layers[i]["a"].shape, layers[i]["b"].shape)
                                                    for i in layers}) != 1:
      return None
    stacked[suffix] = {
        "a": jnp.stack([layers[i]["a"] for i in range(count)]),
        "b": jnp.stack([layers[i]["b"] for i in range(count)]),
        "seed": jnp.asarray([_path_seed(prefix + (str(i),) + suffix) for i in range(count)], jnp.uint32)}
  return stacked


@contextlib.contextmanager
def layer_factors(factors: dict[str, dict]):
  """While one scanned layer is traced: its slice of `stack_layer_factors`, by interceptor id and
  module path relative to the layer."""
  _LAYER.append(factors)
  try:
    yield
  finally:
    _LAYER.pop()


@contextlib.contextmanager
def interceptor(lora, scale: float, dropout: float = 0.0, rng=None, dropout_bits: int = 32):
  """A context manager that adds s * (dropout(x) @ A) @ B to targeted modules' outputs.

  Modules are matched by their scope path, which equals their path in the
  params tree (inside a scanned layer stack: their path within the layer, with the
  layer's stacked factors from `layer_factors`). Dropout is applied to the LoRA branch
  only (PEFT's lora_dropout), with a key derived from `rng` and the module's full path
  (`dropout_lib.dropout` at `dropout_bits`).
  """
  entries = lora_entries(lora)

  def add_lora(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    path = tuple(context.module.scope.path)
    entry = entries.get(path)
    if entry is None and _LAYER:  # inside a scanned layer: this layer's slice of the stacked factors
      entry = _LAYER[-1].get(str(id(entries)), {}).get(path)
    if entry is None:
      return out
    x = args[0]
    if dropout > 0.0 and rng is not None:
      seed = entry["seed"] if "seed" in entry else _path_seed(path)
      x = dropout_lib.dropout(x, dropout, jax.random.fold_in(rng, seed), dropout_bits)
    a = entry["a"].astype(x.dtype)
    b = entry["b"].astype(x.dtype)
    return out + (scale * ((x @ a) @ b)).astype(out.dtype)

  _ACTIVE.append(entries)
  try:
    with nn.intercept_methods(add_lora):
      yield
  finally:
    _ACTIVE.pop()


def check_rank(targets: dict[Path, tuple[int, int]], rank: int) -> None:
  too_small = [f"{path_str(p)} {shape}" for p, shape in targets.items() if rank > min(shape)]
  if too_small:
    raise ValueError(
        f"config.lora.rank={rank} is larger than the smaller dimension of LoRA targets: "
        f"{', '.join(too_small[:3])}. Set config.lora.rank <= {min(min(s) for s in targets.values())}.")


def split_tree(params, patterns: Iterable[str]):
  """Split a nested dict into (rest, matched) by regex on leaf paths."""
  patterns = list(patterns)
  rest, matched = {}, {}
  for key, leaf in traverse_util.flatten_dict(params).items():
    (matched if any(re.search(p, path_str(key)) for p in patterns) else rest)[key] = leaf
  return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(matched)


def join_trees(*trees):
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)
