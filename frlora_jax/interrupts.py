"""Ctrl-C held back while a step must not stop half-way.

The server step donates the previous round's state to the new one (its buffers are
reused in place), so between that step and the round's log entry there is no complete
state in memory to save. An interrupt there is held until the round is logged, then raised.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading


@contextlib.contextmanager
def deferred(message: str = "Interrupt received: finishing this round before saving."):
  """Run the block with SIGINT recorded instead of raised; raise KeyboardInterrupt after it if one came."""
  if threading.current_thread() is not threading.main_thread():
    yield  # signal handlers can only be set from the main thread
    return
  received = []

  def hold(signum, frame):
    if not received:
      print(message, file=sys.stderr, flush=True)
    received.append((signum, frame))

  previous = signal.signal(signal.SIGINT, hold)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    if callable(previous):
      previous(*received[0])
    elif previous == signal.SIG_DFL:
      raise KeyboardInterrupt
