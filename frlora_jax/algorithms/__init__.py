"""Federated algorithms by name: `algorithms.build(name, **hyperparams)`."""
from frlora_jax.algorithms.base import Algorithm, ServerState, weighted_mean
from frlora_jax.algorithms.fedavg import fedavg
from frlora_jax.algorithms.ffa_lora import ffa_lora
from frlora_jax.algorithms.frlora import frlora

REGISTRY = {
    "frlora": frlora,
    "fedavg": fedavg,
    "ffa_lora": ffa_lora,
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def build(name: str, **hyperparams) -> Algorithm:
  if name not in REGISTRY:
    raise ValueError(f"config.fl.algorithm={name!r} is unknown; use one of {', '.join(REGISTRY)}.")
  return REGISTRY[name](**hyperparams)
