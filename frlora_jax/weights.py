"""Pre-trained weights into a Flax parameter tree, in the storage dtype, one tensor at a time.

HF's Flax `from_pretrained` reads a PyTorch safetensors checkpoint whole and then converts it,
so two full copies exist at once (27 GB of host memory for a 7B model in bf16). Here every
tensor is read, renamed and reshaped by HF's own `rename_key_and_reshape_tensor` (no torch
needed), cast to the storage dtype and only then is the next one read: the peak is one copy
of the model plus one tensor. Flax msgpack checkpoints (and GGUF imports, which are written
as msgpack) go through `from_pretrained` and are cast leaf by leaf.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
FLAX_FILE = "flax_model.msgpack"


def dtype_of(name: str, field: str = "config.model.param_dtype"):
  if name not in DTYPES:
    raise ValueError(f"{field}={name!r} is unknown; use one of {', '.join(DTYPES)}.")
  return DTYPES[name]


def safetensors_files(source: str) -> list[str]:
  """The PyTorch safetensors shards of a local dir (or hub id: downloaded), or [] if it has a Flax checkpoint."""
  if not os.path.isdir(source):
    source = _download(source)
    if source is None:
      return []
  if os.path.exists(os.path.join(source, FLAX_FILE)):
    return []
  index = os.path.join(source, SAFETENSORS_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(source, shard) for shard in shards]
  single = os.path.join(source, SAFETENSORS_FILE)
  return [single] if os.path.exists(single) else []


def _download(repo_id: str) -> Optional[str]:
  """A hub repo's config and safetensors weights (not its .bin / .msgpack copies); None if it has none."""
  import huggingface_hub
  files = huggingface_hub.list_repo_files(repo_id)
  if FLAX_FILE in files or not any(f.endswith(".safetensors") for f in files):
    return None
  return huggingface_hub.snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def _stored(value, dtype):
  """`value` in the storage dtype on the default device: cast on the host, so the device receives only
  the stored bytes, and through NumPy, so nothing stays committed to the device HF put it on."""
  return jnp.asarray(np.asarray(value, np.dtype(dtype)))


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for each tensor of a safetensors file, read one at a time with plain reads.

  The format is an 8-byte little-endian header length, a JSON header of name -> dtype, shape,
  data_offsets, then the data. safetensors.safe_open maps the whole file instead, and the
  mapped pages it touches stay resident until the file is closed: a second copy in RSS.
  """
  with open(path, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
      begin, end = info["data_offsets"]
      f.seek(8 + header_size + begin)
      data = f.read(end - begin)
      yield name, np.frombuffer(data, SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def expected_shapes(flax_model) -> dict:
  """{flat path: ShapeDtypeStruct} of an architecture-only HF Flax model (nothing allocated)."""
  return traverse_util.flatten_dict(
      jax.eval_shape(lambda: flax_model.init_weights(jax.random.PRNGKey(0), flax_model.input_shape)))


def stream_safetensors(files: list[str], flax_model, storage_dtype: Callable[[tuple], Any]) -> dict:
  """`flax_model`'s params (flat, by path) from PyTorch safetensors shards.

  flax_model: an HF Flax model built with `_do_init=False` (architecture only).
  storage_dtype(flax_path) -> dtype each tensor is stored in.
  """
  from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor
  expected = expected_shapes(flax_model)
  prefix = flax_model.base_model_prefix
  has_prefix = any(key[0] == prefix for key in expected)
  params = {}
  for file in files:
    for name, tensor in read_safetensors(file):
      key = tuple(name.split("."))
      if not has_prefix and key[0] == prefix:  # a checkpoint with a head, into a base model
        key = key[1:]
      flax_key, tensor = rename_key_and_reshape_tensor(key, tensor, expected, prefix)
      if flax_key not in expected and (prefix,) + flax_key in expected:  # a base checkpoint, into a model with a head
        flax_key = (prefix,) + flax_key
      if flax_key not in expected:
        logging.info("Unused weight %s in %s", name, file)
        continue
      if tensor.shape != expected[flax_key].shape:
        raise ValueError(f"{file}: weight {name} has shape {tensor.shape}, but the model's config needs "
                         f"{expected[flax_key].shape}; the checkpoint and config.json disagree.")
      params[flax_key] = _stored(tensor, storage_dtype(flax_key))
      del tensor
  return params


def load_params(source: str, model_class, hf_config, *, compute_dtype, storage_dtype: Callable[[tuple], Any],
                fill_missing: Optional[Callable[[dict, set], dict]] = None) -> tuple[Any, dict]:
  """(Flax module, params) of `model_class` from `source`, each leaf stored as `storage_dtype(path)`.

  Leaves the checkpoint lacks are filled by `fill_missing(params, missing)` (a tied LM head,
  say), and any still missing get HF's own random init (seed 0, as `from_pretrained` does:
  a fresh classification head).
  """
  architecture = model_class.from_config(hf_config, _do_init=False, dtype=compute_dtype)
  files = safetensors_files(source)
  if files:
    flat = stream_safetensors(files, architecture, storage_dtype)
  else:
    _, model_params = model_class.from_pretrained(source, config=hf_config, _do_init=False, dtype=compute_dtype)
    flat = {k: _stored(v, storage_dtype(k)) for k, v in traverse_util.flatten_dict(model_params).items()}
  params, missing = traverse_util.unflatten_dict(flat), set(expected_shapes(architecture)) - set(flat)
  if missing and fill_missing is not None:
    params = fill_missing(params, missing)
    missing = missing - set(traverse_util.flatten_dict(params))
  if missing:
    logging.warning("Not in the checkpoint, initialised at random: %s", sorted("/".join(k) for k in missing)[:8])
    fresh = traverse_util.flatten_dict(architecture.init_weights(jax.random.PRNGKey(0), architecture.input_shape))
    flat = traverse_util.flatten_dict(params)
    flat.update({k: _stored(fresh[k], storage_dtype(k)) for k in missing})
    params = traverse_util.unflatten_dict(flat)
  return architecture.module, params

