"""FedReg, as in the published FRLoRA / OpenFedLLM trainer: FedAvg with mu/2 ||s A B||_F^2 in the local loss.

The penalty is on the adapter's current update s A B of every target (the published trainer
regularises ||s B A||^2 of the PyTorch factors, the same product). ||A B||_F^2 is computed as
tr((A^T A)(B B^T)), two r x r products, so no [in, out] matrix is formed.
"""
from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm
from frlora_jax.algorithms.fedavg import fedavg


def update_norm_penalty(lora, lora_scale: float, mu: float):
  """mu/2 * sum over targets of ||s A B||_F^2."""
  return 0.5 * mu * lora_scale ** 2 * sum(lora_lib.map_targets(lora_lib.product_squared_norm, lora).values())


def fedreg(*, mu: float, lora_scale: float) -> Algorithm:
  if mu < 0:
    raise ValueError(f"config.fl.fedreg_mu={mu} must be >= 0.")
  return fedavg()._replace(name="fedreg",
                           regularizer=lambda trainable, client: update_norm_penalty(trainable["lora"], lora_scale, mu))
