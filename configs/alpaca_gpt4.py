"""Alpaca-GPT4 (REFERENCE.md): IID, 20 clients, 2 per round, r32/alpha64, lr 5e-4.

Open-ended answers: the headline metric is held-out perplexity on response tokens.
"""
from frlora_jax import recipes


def get_config(arg=None):
  return recipes.paper_nlg(source="hub", path="vicgalle/alpaca-gpt4", clients=20, per_round=2, rank=32, lr=5e-4,
                          rounds=100, instruction_field="instruction", input_field="input",
                          response_field="output")
