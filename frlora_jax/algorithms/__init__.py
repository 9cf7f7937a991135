"""Federated algorithms by name: `algorithms.build(name, **hyperparams)`."""
from frlora_jax.algorithms.base import Algorithm, ServerState, weighted_mean
from frlora_jax.algorithms.fedavg import fedavg
from frlora_jax.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from frlora_jax.algorithms.fedprox import fedprox
from frlora_jax.algorithms.fedsa_lora import fedsa_lora
from frlora_jax.algorithms.ffa_lora import ffa_lora
from frlora_jax.algorithms.flexlora import flexlora
from frlora_jax.algorithms.flora import flora
from frlora_jax.algorithms.frlora import frlora
from frlora_jax.algorithms.scaffold import scaffold

REGISTRY = {
    "frlora": frlora,
    "fedavg": fedavg,
    "ffa_lora": ffa_lora,
    "fedprox": fedprox,
    "scaffold": scaffold,
    "fedavgm": fedavgm,
    "fedadagrad": fedadagrad,
    "fedyogi": fedyogi,
    "fedadam": fedadam,
    "flora": flora,
    "flexlora": flexlora,
    "fedsa_lora": fedsa_lora,
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def build(name: str, **hyperparams) -> Algorithm:
  if name not in REGISTRY:
    raise ValueError(f"config.fl.algorithm={name!r} is unknown; use one of {', '.join(REGISTRY)}.")
  return REGISTRY[name](**hyperparams)
