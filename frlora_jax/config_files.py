"""Config files (configs/X.py[:variant]) loaded as train.py's --config flag loads them, for the
tools that take a config outside absl (benchmarks, tests)."""
from __future__ import annotations

import importlib.util
import os


def load(path: str, arg: str | None = None):
  """`get_config(arg)` of the config file at `path` (`get_config()` when no arg is given)."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def load_spec(spec: str):
  """A config given as `path[:variant]`, the form of train.py's --config."""
  path, _, arg = spec.partition(":")
  return load(path, arg or None)
