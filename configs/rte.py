"""rte: the paper's NLU setting (REFERENCE.md); ':official' for the published code's settings."""
from frlora_jax import recipes


def get_config(arg=None):
  return recipes.variant(recipes.paper_nlu("rte", local_steps=10), arg)
