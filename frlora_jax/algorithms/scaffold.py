"""SCAFFOLD (Karimireddy et al. 2020) on the trainable tree, option II control variates.

Local gradients are corrected by (c - c_i). After K local steps at learning rate eta,
    c_i+ = c_i - c + (x - y_i) / (K * eta)
and the server takes x <- x + mean_k(y_k - x), c <- c + |S|/N * mean_k(c_k+ - c_k).
With AdamW as the local optimizer, eta is config.optim.lr (as in common federated-LLM
baselines). Client control variates persist across rounds in the client state.
"""
import jax

from frlora_jax.algorithms.base import (Algorithm, global_trainable, tree_sub, tree_zeros_like, weighted_mean,
                                        with_trainable)


def scaffold(*, config, **_) -> Algorithm:
  steps_times_lr = config.fl.local_steps * config.optim.lr
  num_clients = config.fl.num_clients

  def init(server):
    return server.replace(extra={"c": tree_zeros_like(global_trainable(server))})

  def init_client(server):
    return {"c_i": tree_zeros_like(global_trainable(server))}

  def client_payload(server, client_state):
    return {"correction": tree_sub(server.extra["c"], client_state["c_i"])}

  def grad_correction(grads, client):
    return jax.tree_util.tree_map(lambda g, d: g + d, grads, client.extra["correction"])

  def aggregate(server, trainables, weights, client_states):
    x, c = global_trainable(server), server.extra["c"]
    c_new = jax.tree_util.tree_map(
        lambda c_i, y, x_, c_: c_i - c_ + (x_ - y) / steps_times_lr,
        client_states["c_i"], trainables, x, c)
    y_mean = weighted_mean(trainables, weights)
    sampled = weights.shape[0]
    dc = weighted_mean(tree_sub(c_new, client_states["c_i"]), weights)
    c = jax.tree_util.tree_map(lambda c_, d: c_ + (sampled / num_clients) * d, c, dc)
    return with_trainable(server, y_mean).replace(extra={"c": c}), {"c_i": c_new}

  return Algorithm(name="scaffold", lora_init="kaiming", freeze_a=None, aggregate=aggregate, init=init,
                   init_client=init_client, client_payload=client_payload, grad_correction=grad_correction,
                   uploads=("lora", "head", "control"), downloads=("lora", "head", "control"))
