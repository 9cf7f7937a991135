"""frlora_jax: Federated Residual Low-Rank Adaptation (FRLoRA) and federated-LoRA baselines in JAX/Flax."""
__version__ = "0.1.0"
