"""Fed-ChatbotIT (REFERENCE.md): 237 natural clients, 10 per round, r16/alpha32, lr 2e-4; FedLLM-Bench's settings.

FedLLM-Bench builds it from Chatbot Arena conversations (lmsys/chatbot_arena_conversations,
gated on the hub), one client per user ("judge"). Multi-turn conversations train on every
assistant turn. For FedLLM-Bench's own JSON set config.data.source=jsonl, .path and the fields.
"""
from frlora_jax import recipes


def get_config(arg=None):
  c = recipes.paper_nlg(source="hub", path="lmsys/chatbot_arena_conversations", clients=237, per_round=10,
                        rank=16, lr=2e-4,
                        rounds=100,  # FedLLM-Bench FedChatbotIT/all.sh: num_rounds=100 (the paper: 100 or 200)
                        partition="natural", natural_field="judge", messages_field="conversation_a")
  return recipes.fedllm_bench(c, local_steps=5)  # FedChatbotIT/all.sh: max_steps=5
