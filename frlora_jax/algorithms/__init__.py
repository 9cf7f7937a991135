"""Federated algorithms by name: `algorithms.from_config(config)`, `algorithms.register(name, builder)`.

A builder maps a config to an `Algorithm`, reading exactly the hyperparameters its factory
takes (factories have explicit keyword arguments, so nothing is silently dropped).
"""
from typing import Callable

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms import fedopt
from frlora_jax.algorithms.base import (Algorithm, ServerState, global_trainable, lora_settings, weighted_mean,
                                        with_trainable)
from frlora_jax.algorithms.fedavg import fedavg
from frlora_jax.algorithms.fedex_lora import fedex_lora
from frlora_jax.algorithms.fedprox import fedprox
from frlora_jax.algorithms.fedreg import fedreg
from frlora_jax.algorithms.fedsa_lora import fedsa_lora
from frlora_jax.algorithms.fedsvd import fedsvd
from frlora_jax.algorithms.ffa_lora import ffa_lora
from frlora_jax.algorithms.flexlora import flexlora
from frlora_jax.algorithms.flora import flora
from frlora_jax.algorithms.frlora import frlora
from frlora_jax.algorithms.hetlora import hetlora
from frlora_jax.algorithms.rolora import rolora
from frlora_jax.algorithms.scaffold import scaffold

Builder = Callable[..., Algorithm]  # (config) -> Algorithm

REGISTRY: dict[str, Builder] = {
    "frlora": lambda c: frlora(lora_scale=lora_lib.scale(c.lora), aggregation=c.fl.aggregation),
    "fedavg": lambda c: fedavg(),
    "ffa_lora": lambda c: ffa_lora(),
    "fedprox": lambda c: fedprox(mu=float(c.fl.prox_mu)),
    "scaffold": lambda c: scaffold(local_steps=c.fl.local_steps, lr=c.optim.lr, num_clients=c.fl.num_clients),
    "fedavgm": lambda c: fedopt.from_fl_config("fedavgm", c.fl),
    "fedadagrad": lambda c: fedopt.from_fl_config("fedadagrad", c.fl),
    "fedyogi": lambda c: fedopt.from_fl_config("fedyogi", c.fl),
    "fedadam": lambda c: fedopt.from_fl_config("fedadam", c.fl),
    "flora": lambda c: flora(lora_scale=lora_lib.scale(c.lora)),
    "flexlora": lambda c: flexlora(),
    "fedsa_lora": lambda c: fedsa_lora(),
    "fedreg": lambda c: fedreg(mu=float(c.fl.fedreg_mu), lora_scale=lora_lib.scale(c.lora)),
    "fedex_lora": lambda c: fedex_lora(lora_scale=lora_lib.scale(c.lora)),
    "rolora": lambda c: rolora(),
    "fedsvd": lambda c: fedsvd(),
    "hetlora": lambda c: hetlora(prune_gamma=float(c.fl.hetlora_prune_gamma),
                                 prune_lambda=float(c.fl.hetlora_prune_lambda)),
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def register(name: str, builder: Builder) -> None:
  """Make `config.fl.algorithm=name` (train.py, compare) build `builder(config)`.

  Call it where the run's config is defined (a config file is imported by train.py and
  compare), or in a notebook before `experiment.build`.
  """
  REGISTRY[name] = builder


def from_config(config) -> Algorithm:
  """The run's algorithm: the one place an `Algorithm` is built from a config."""
  name = config.fl.algorithm
  if name not in REGISTRY:
    raise ValueError(f"config.fl.algorithm={name!r} is unknown; use one of {', '.join(REGISTRY)}, or "
                     f"register it first with frlora_jax.algorithms.register (e.g. in the config file).")
  return REGISTRY[name](config)
