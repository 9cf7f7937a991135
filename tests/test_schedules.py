"""Learning-rate schedules: HF's warmup-cosine per step, and OpenFedLLM's per-round cosine."""
import math

import numpy as np
import pytest

from frlora_jax import experiment, optim


def openfedllm_lr(current_round, total_rounds, initial_lr, min_lr):
  """Transcription of OpenFedLLM's utils.cosine_learning_rate (round index from 0)."""
  return min_lr + 0.5 * (initial_lr - min_lr) * (1 + math.cos(math.pi * current_round / total_rounds))


def test_round_cosine_matches_openfedllm():
  lr, min_lr, rounds, local_steps = 5e-5, 1e-6, 200, 10
  schedule = optim.make_schedule("round_cosine", warmup_ratio=0.03, lr=lr, min_lr=min_lr)
  for r in (0, 1, 57, 199):
    start = r * local_steps
    got = [float(schedule(start + i, start, rounds * local_steps)) * lr for i in range(local_steps)]
    assert got == pytest.approx([openfedllm_lr(r, rounds, lr, min_lr)] * local_steps, rel=1e-5)


def test_warmup_cosine_is_hf_cosine_with_warmup():
  schedule = optim.make_schedule("warmup_cosine", warmup_ratio=0.1, lr=1.0, min_lr=0.0)
  total = 100
  got = np.array([float(schedule(s, 0, total)) for s in range(total)])
  expected = [s / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(total)]
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_schedule_reaches_the_client_steps(make_config):
  losses = {}
  for schedule in ("warmup_cosine", "round_cosine"):
    exp = experiment.build(make_config(**{"optim.schedule": schedule}))
    _, record = experiment.run_round(exp, exp.init_state(), 0)
    losses[schedule] = record["client_losses"]
  # round 1 of warmup_cosine warms up from 0 (first step's lr is 0); round_cosine starts at full lr
  assert losses["warmup_cosine"] != losses["round_cosine"]
