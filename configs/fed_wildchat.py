"""Fed-WildChat (REFERENCE.md): 100 natural clients, 5 per round, r16/alpha32, lr 2e-4; FedLLM-Bench's settings.

FedLLM-Bench builds it from WildChat (allenai/WildChat), one client per user (hashed IP),
keeping the 100 most active. Multi-turn conversations train on every assistant turn. For
FedLLM-Bench's own JSON set config.data.source=jsonl, .path and the field names.
"""
from frlora_jax import recipes


def get_config(arg=None):
  c = recipes.paper_nlg(source="hub", path="allenai/WildChat", clients=100, per_round=5, rank=16, lr=2e-4,
                        rounds=100,  # FedLLM-Bench FedWildChat/single_turn/all.sh: num_rounds=100
                        partition="natural", natural_field="hashed_ip", messages_field="conversation")
  return recipes.fedllm_bench(c, local_steps=10)  # FedWildChat/single_turn/all.sh: max_steps=10
