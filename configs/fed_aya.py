"""Fed-Aya (REFERENCE.md): natural clients = the 38 most active annotators, 4 per round, r16/alpha32, lr 2e-4.

FedLLM-Bench builds Fed-Aya from the Aya dataset (CohereForAI/aya_dataset: inputs, targets,
language, user_id). This config rebuilds it from that public source: one client per user_id,
keeping the 38 users with most records. To use FedLLM-Bench's own JSON instead, set
config.data.source=jsonl, config.data.path and the field names of that file.
"""
from frlora_jax import recipes


def get_config(arg=None):
  return recipes.paper_nlg(source="hub", path="CohereForAI/aya_dataset", clients=38, per_round=4, rank=16,
                          lr=2e-4, rounds=200, partition="natural", natural_field="user_id",
                          instruction_field="inputs", response_field="targets")
