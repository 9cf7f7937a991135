"""FFA-LoRA: A frozen at its random init, only B (and the head) trained and averaged."""
from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def ffa_lora(**_) -> Algorithm:
  def aggregate(server, trainables, weights, client_states):
    client_entries = lora_lib.lora_entries(trainables["lora"])
    lora = lora_lib.from_entries({
        path: {"a": entry["a"], "b": weighted_mean(client_entries[path]["b"], weights)}
        for path, entry in lora_lib.lora_entries(server.lora).items()})
    return server.replace(lora=lora, head=weighted_mean(trainables["head"], weights)), client_states

  return Algorithm(name="ffa_lora", lora_init="kaiming", freeze_a=True, aggregate=aggregate,
                   uploads=("lora_b", "head"), downloads=("lora_b", "head"))
