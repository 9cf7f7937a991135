"""The run's random streams: one for initialisation, one for rounds, derived from the seed alone.

Keeping them apart means no round ever reuses an initialisation key (the Kaiming init key
was once also round 2's key); a client's key for a round depends only on (seed, round, id),
so any executor, process count or resume draws the same numbers.
"""
import jax


def privacy_key(seed: int, round_index):
  """The server's noise key for a round (client-level DP): a third stream of the seed."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 2), round_index)


def random_streams(seed: int) -> tuple[jax.Array, jax.Array]:
  """(initialisation key, rounds key)."""
  root = jax.random.PRNGKey(seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def round_keys(seed: int, round_index, ids):
  """Each sampled client's key for a round: fold_in(fold_in(rounds key, round), client id)."""
  round_key = jax.random.fold_in(random_streams(seed)[1], round_index)
  return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)
