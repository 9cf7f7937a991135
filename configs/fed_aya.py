"""Fed-Aya (REFERENCE.md): natural clients = the 38 most active annotators, 4 per round, r16/alpha32, lr 2e-4; FedLLM-Bench's settings.

FedLLM-Bench builds Fed-Aya from the Aya dataset (CohereForAI/aya_dataset: inputs, targets,
language, user_id). This config rebuilds it from that public source: one client per user_id,
keeping the 38 users with most records. To use FedLLM-Bench's own JSON instead, set
config.data.source=jsonl, config.data.path and the field names of that file.
"""
from frlora_jax import recipes


def get_config(arg=None):
  c = recipes.paper_nlg(source="hub", path="CohereForAI/aya_dataset", clients=38, per_round=4, rank=16, lr=2e-4,
                        rounds=200,  # FedLLM-Bench FedAya/aya_all.sh: num_rounds=200 (the paper: 100 or 200)
                        partition="natural", natural_field="user_id", instruction_field="inputs",
                        response_field="targets")
  return recipes.fedllm_bench(c, local_steps=10)  # FedAya/aya_all.sh: max_steps=10
