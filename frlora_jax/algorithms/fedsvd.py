"""FedSVD (2025; github seanie12/fed-svd): clients train B only; the server re-factors by SVD.

Each round the server averages B and re-factors the global update A B_avg by SVD, taking A
from its singular vectors on the input side (orthonormal) and B as the rest:

    A B_avg = U S V^T  ->  A <- U[:, :r],  B <- S[:r] V^T[:r]

(this project's layout: a [in, r] is the paper's A^T, so the paper's "right singular
vectors" are U here). A stays frozen on the clients; A B is unchanged by the re-factoring,
but the next round trains B against an orthonormal A. The SVD runs on the thin factors (QR
of each, then an r x r SVD), never on an [in, out] matrix. Designed for DP, where only B's
gradients carry noise.
"""
import jax.numpy as jnp

from frlora_jax import lora as lora_lib
from frlora_jax.algorithms.base import Algorithm, weighted_mean


def orthonormal_a(a, b):
  """(U, S V^T) for the SVD U S V^T of a @ b (a [in, r], b [r, out]), from the factors' QRs."""
  q_a, r_a = jnp.linalg.qr(a)
  q_b, r_b = jnp.linalg.qr(b.T)
  u, s, vt = jnp.linalg.svd(r_a @ r_b.T)
  return q_a @ u, (s[:, None] * vt) @ q_b.T


def fedsvd() -> Algorithm:
  def aggregate(server, client_trainables, weights, client_states):
    def refactor(current, clients):
      b_avg = jnp.tensordot(weights.astype(jnp.float32), clients["b"].astype(jnp.float32), axes=1)
      a, b = orthonormal_a(current["a"].astype(jnp.float32), b_avg)
      return {"a": a.astype(current["a"].dtype), "b": b.astype(current["b"].dtype)}

    return server.replace(lora=lora_lib.map_lora(refactor, server.lora, client_trainables["lora"]),
                          head=weighted_mean(client_trainables["head"], weights)), client_states

  return Algorithm(name="fedsvd", aggregate=aggregate, freeze_a=True, mean_based=True, uploads=("lora_b", "head"),
                   downloads=("lora", "head"))
