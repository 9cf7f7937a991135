"""Count XLA compilations, to check that rounds after the first compile nothing."""
from __future__ import annotations

import contextlib

import jax.monitoring

_EVENT = "/jax/core/compile/backend_compile_duration"
_counter = {"compiles": 0}
_registered = False


def _listener(name, duration, **kwargs):
  if name == _EVENT:
    _counter["compiles"] += 1


def total() -> int:
  """XLA compilations in this process since counting started."""
  global _registered
  if not _registered:
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _registered = True
  return _counter["compiles"]


class Count:
  """Compilations inside a `counting()` block; frozen when the block exits."""

  def __init__(self):
    self._start, self._end = total(), None

  def __call__(self) -> int:
    return (total() if self._end is None else self._end) - self._start


@contextlib.contextmanager
def counting():
  """with counting() as n: ...; n() is the number of compilations inside the block."""
  count = Count()
  try:
    yield count
  finally:
    count._end = total()
