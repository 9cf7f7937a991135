"""The project's algorithms and local update on Flower's deployment engine (pip install -e '.[flower]').

- `server_app`: a ServerApp that runs `experiment.run` with the clients on Flower nodes: the server
  keeps the global state (FRLoRA's residual base included), samples, aggregates with the
  project's own `Algorithm`, evaluates, logs and checkpoints as in simulation.
- `client_app`: a ClientApp that plays one client (its node's `partition-id`) with the project's
  own jitted local update, on its partition of the data.
- `sync`: what travels each round, and how a node keeps its replica of the global model.
- `local`: one command that starts a SuperLink and N SuperNodes on 127.0.0.1, runs the app and
  stops them.
"""

INSTALL_HINT = "install the Flower extra: pip install -e '.[flower]' (flwr==1.42.0)"


def require_flower() -> None:
  """Stop with the install command when Flower is missing (before any work)."""
  import importlib.util
  if importlib.util.find_spec("flwr") is None:
    raise SystemExit(f"error: frlora_jax.flower needs Flower, which is not installed; {INSTALL_HINT}.")
