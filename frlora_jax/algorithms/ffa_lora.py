"""FFA-LoRA: A frozen at its random init, only B (and the head) trained and averaged."""
from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def ffa_lora() -> Algorithm:
  def aggregate(server, client_trainables, weights, client_states):
    lora = lora_lib.map_lora(lambda kept, clients: {"a": kept["a"], "b": weighted_mean(clients["b"], weights)},
                             server.lora, client_trainables["lora"])
    return server.replace(lora=lora, head=weighted_mean(client_trainables["head"], weights)), client_states

  return Algorithm(name="ffa_lora", lora_init="kaiming", freeze_a=True, mean_based=True, aggregate=aggregate,
                   uploads=("lora_b", "head"), downloads=("lora_b", "head"))
