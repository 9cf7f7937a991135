"""Defaults every task config starts from (they live in frlora_jax.defaults)."""
from frlora_jax.defaults import get_config  # noqa: F401
