"""MetaMathQA (REFERENCE.md): IID, 10 clients, 2 per round, r32/alpha64, lr 5e-4; OpenFedLLM's settings.

Records are query/response; the response ends with "The answer is: N", so exact match
compares final numbers (on a seeded 1% hold-out; generation on 200 of them per eval).
"""
from frlora_jax import recipes


def get_config(arg=None):
  c = recipes.paper_nlg(source="hub", path="meta-math/MetaMathQA", clients=10, per_round=2, rank=32, lr=5e-4,
                        rounds=100, instruction_field="query", response_field="response")  # the FRLoRA paper
  recipes.openfedllm(c)  # targets, 512 tokens, batch 16, 10 local steps, per-round cosine (OpenFedLLM's code)
  c.data.metric, c.data.answer_format = "exact_match", "number"
  c.data.max_new_tokens, c.data.max_generate_examples = 256, 200
  return c
