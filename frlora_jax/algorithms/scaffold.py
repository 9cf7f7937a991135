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


def scaffold(*, local_steps: int, lr: float, num_clients: int) -> Algorithm:
  steps_times_lr = local_steps * lr

  def init(server, key):
    return server.replace(algorithm_state={"c": tree_zeros_like(global_trainable(server))})

  def init_client_state(server):
    return {"c_i": tree_zeros_like(global_trainable(server))}

  def client_context(server, client_state):
    return {"correction": tree_sub(server.algorithm_state["c"], client_state["c_i"])}

  def grad_correction(grads, client):
    return jax.tree_util.tree_map(lambda g, d: g + d, grads, client.context["correction"])

  def aggregate(server, client_trainables, weights, client_states):
    x, c = global_trainable(server), server.algorithm_state["c"]
    c_new = jax.tree_util.tree_map(
        lambda c_i, y, x_, c_: c_i - c_ + (x_ - y) / steps_times_lr,
        client_states["c_i"], client_trainables, x, c)
    y_mean = weighted_mean(client_trainables, weights)
    sampled = weights.shape[0]
    dc = weighted_mean(tree_sub(c_new, client_states["c_i"]), weights)
    c = jax.tree_util.tree_map(lambda c_, d: c_ + (sampled / num_clients) * d, c, dc)
    return with_trainable(server, y_mean).replace(algorithm_state={"c": c}), {"c_i": c_new}

  return Algorithm(name="scaffold", aggregate=aggregate, init=init, init_client_state=init_client_state,
                   client_context=client_context, grad_correction=grad_correction,
                   uploads=("lora", "head", "control"), downloads=("lora", "head", "control"))
