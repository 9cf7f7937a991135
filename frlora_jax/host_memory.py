"""Give freed host memory back to the operating system.

Loading a checkpoint and compiling a large XLA:CPU program both allocate and free gigabytes of
small blocks; glibc keeps freed heap mapped, so the process's resident size stays at its peak
and the next phase stacks on top of it (the 135M NLG demo: 2.2 GB resident after loading a
0.65 GB model, 1.5 GB once trimmed). `release()` asks glibc to return it (`malloc_trim`); a
no-op where there is no glibc. Below `WORTH_IT_BYTES` of weights it is skipped: what glibc keeps
back is then small, and the garbage collection it needs takes 0.2-1 s in a long-lived process
(a test worker, a notebook).
"""
import ctypes
import ctypes.util
import functools
import gc

import jax


@functools.lru_cache(maxsize=None)
def _libc():
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
  except OSError:
    return None
  return libc if libc is not None and hasattr(libc, "malloc_trim") else None


WORTH_IT_BYTES = 256 * 2**20


def worth_it(weight_bytes: int) -> bool:
  """Whether a model of `weight_bytes` is big enough for `release` to pay."""
  return weight_bytes >= WORTH_IT_BYTES


def release(weight_bytes: int) -> None:
  """Collect garbage, then hand free heap pages back to the OS, for a model of `weight_bytes`."""
  if not worth_it(weight_bytes):
    return
  gc.collect()
  libc = _libc()
  if libc is not None:
    libc.malloc_trim(0)


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays or ShapeDtypeStructs (`release`'s measure of a model, the planner's of state)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
