"""Federated LoRA fine-tuning: python train.py --config configs/qnli.py --workdir runs/qnli

Override any field with --config.<field>=<value>, e.g. --config.fl.rounds=20.
Re-running the same command on the same workdir resumes from the last checkpoint.
"""
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from frlora_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])
_JOIN_PROCESSES = distributed.define_flags()


def main(argv):
  del argv
  # Ctrl-C (or `kill -INT`) saves a checkpoint and stops. A run started as a background job
  # inherits SIGINT as ignored, and Python then raises no KeyboardInterrupt: restore it.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the progress output
  import transformers
  transformers.logging.set_verbosity_error()
  from frlora_jax import experiment
  try:
    _JOIN_PROCESSES()  # a multi-process run (distributed.py), before anything touches a device
    records = experiment.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, experiment.NonFiniteError) as e:
    raise SystemExit(f"error: {e}") from None
  except Exception as e:  # noqa: BLE001 - only a multi-process run's failed collective is handled here
    distributed.stop_if_lost_process(e)
    raise
  evals = [r for r in records if "eval" in r]
  if evals and distributed.is_main():
    metric = _CONFIG.value.data.metric
    best = max(r["eval"][metric] for r in evals)
    print(f"done: {len(records)} rounds this run; final eval {metric} {evals[-1]['eval'][metric]:.4f}, "
          f"best {best:.4f}; outputs in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
