"""The server step in place: same result as the copying step, the old state's buffers reused; Ctrl-C held meanwhile."""
import os
import signal

import jax
import numpy as np
import pytest

from frlora_jax import experiment, interrupts


def test_in_place_server_step_equals_the_copying_one_and_consumes_the_old_state(make_config):
  exp = experiment.build(make_config(**{"fl.algorithm": "frlora"}))
  state = exp.init_state()
  updates = experiment.local_updates(exp, state, 0)
  copied = experiment.server_update(exp, state, updates)
  old_base = state.server.base
  in_place = experiment.server_update(exp, state, updates, in_place=True)
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old_base))  # donated: no second base
  for a, b in zip(jax.tree_util.tree_leaves(copied), jax.tree_util.tree_leaves(in_place)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_interrupt_is_held_until_the_block_ends():
  # Python's own handler, as train.py installs it (a process started in the background inherits SIGINT ignored)
  original = signal.signal(signal.SIGINT, signal.default_int_handler)
  finished = []
  try:
    with pytest.raises(KeyboardInterrupt):
      with interrupts.deferred("held"):
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)  # still runs: the interrupt only lands after the block
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back
  finally:
    signal.signal(signal.SIGINT, original)


def test_no_interrupt_means_no_exception():
  with interrupts.deferred():
    pass
