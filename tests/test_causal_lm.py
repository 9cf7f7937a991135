"""Causal LMs: LoRA on Llama and GPT-2, the rope_theta fix, GGUF layout, KV-cache generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frlora_jax import causal_lm, generation, gguf_import, lora

TARGETS = {"llama": [r"(q|k|v|o)_proj$", r"(gate|up|down)_proj$"], "gpt2": [r"c_attn$", r"c_proj$", r"c_fc$"]}


def _tiny(arch, **kw):
  kw = dict(hidden=32, layers=2, heads=4, vocab=97, max_positions=64, initializer_range=0.2, **kw)
  if arch == "llama":
    kw.setdefault("kv_heads", 2)
    kw.setdefault("rope_theta", 50000.0)
  return causal_lm.random_causal_lm(arch, **kw)


def _batch(vocab=97, batch=3, length=12, seed=0):
  ids = jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 3, vocab)
  mask = jnp.ones((batch, length), jnp.int32).at[1, 9:].set(0)  # one right-padded row
  return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_forward_equals_merged_weights_forward(arch):
  model = _tiny(arch)
  apply = causal_lm.make_apply(model)
  targets = lora.find_targets(model.params, TARGETS[arch])
  assert len(targets) == (7 if arch == "llama" else 4) * 2
  tree = lora.init_kaiming(jax.random.PRNGKey(1), targets, rank=4)
  tree = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), tree)
  batch = _batch()
  with lora.interceptor(tree, 2.0):
    adapted = apply(model.params, batch)
  merged = apply(lora.merge(model.params, tree, 2.0), batch)
  plain = apply(model.params, batch)
  assert float(jnp.abs(adapted - plain).max()) > 1e-2  # the adapter changes the output
  np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pissa_init_leaves_logits_unchanged(arch):
  model = _tiny(arch)
  apply = causal_lm.make_apply(model)
  targets = lora.find_targets(model.params, TARGETS[arch])
  tree, residual = lora.init_pissa(model.params, targets, rank=4, scale=2.0)
  batch = _batch()
  with lora.interceptor(tree, 2.0):
    pissa = apply(residual, batch)
  np.testing.assert_allclose(np.asarray(pissa), np.asarray(apply(model.params, batch)), atol=2e-4, rtol=1e-4)


def test_gpt2_kernels_are_stored_in_out_and_round_trip_to_hf_layout():
  from transformers import FlaxGPT2LMHeadModel
  model = _tiny("gpt2")
  c_fc = model.params["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
  assert c_fc.shape == (32, 4 * 32)  # [in, out], like nn.Dense
  hf = FlaxGPT2LMHeadModel(model.hf_config, _do_init=False)
  batch = _batch()
  ours = causal_lm.make_apply(model)(model.params, batch)
  theirs = hf.module.apply({"params": causal_lm.to_hf_layout("gpt2", model.params)}, batch["input_ids"],
                           batch["attention_mask"], causal_lm.positions(batch["attention_mask"])).logits
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_rope_theta_is_honoured():
  """Our rotary table uses config.rope_theta; HF's stock FlaxLlama would use 10000 regardless."""
  model = _tiny("llama", rope_theta=50000.0)
  batch = _batch()
  fixed = causal_lm.make_apply(model)(model.params, batch)
  stock = model.module.apply({"params": model.params}, batch["input_ids"], batch["attention_mask"],
                             causal_lm.positions(batch["attention_mask"])).logits
  assert float(jnp.abs(fixed - stock).max()) > 1e-3
  # With theta 10000 the fix and the stock module agree exactly.
  base = _tiny("llama", rope_theta=10000.0)
  stock = base.module.apply({"params": base.params}, batch["input_ids"], batch["attention_mask"],
                            causal_lm.positions(batch["attention_mask"])).logits
  np.testing.assert_allclose(np.asarray(causal_lm.make_apply(base)(base.params, batch)), np.asarray(stock), atol=1e-6)
  # The table itself: angle of position p, frequency i is p / theta^(2i/d).
  table = causal_lm.RotaryEmbedding(model.hf_config).bind({}).sincos
  head_dim = 32 // 4
  expected_sin = np.sin(5 / 50000.0 ** (2 * 1 / head_dim))
  np.testing.assert_allclose(float(table[5, 0, 1]), expected_sin, rtol=1e-5)


def test_a_tied_llama_keeps_one_output_matrix():
  """No lm_head copy of a tied embedding: the logits (full, chunked, one position of a KV-cache step) are
  what FlaxLlama computes with lm_head = embedding^T, which is what an export writes back for HF."""
  model = _tiny("llama", tie=True)
  assert "lm_head" not in model.params
  with_copy = causal_lm.tie_lm_head("llama", model.hf_config, model.params)
  np.testing.assert_array_equal(np.asarray(with_copy["lm_head"]["kernel"]),
                                np.asarray(model.params["model"]["embed_tokens"]["embedding"]).T)
  assert "lm_head" in causal_lm.drop_tied_head("llama", model.hf_config, with_copy, keep=True)  # LoRA on lm_head
  batch = _batch()
  apply = causal_lm.make_apply(model)
  tied, copied = apply(model.params, batch), apply(with_copy, batch)
  np.testing.assert_allclose(np.asarray(tied), np.asarray(copied), atol=1e-5, rtol=1e-5)
  hidden, kernel = causal_lm.make_hidden_apply(model)(model.params, batch)
  assert kernel.vocab_major and kernel.weight.shape == (97, 32)
  np.testing.assert_allclose(np.asarray(kernel.logits(hidden)), np.asarray(copied), atol=1e-5, rtol=1e-5)
  ones = jnp.ones_like(tied)
  _, copied_kernel = causal_lm.make_hidden_apply(model)(with_copy, batch)
  np.testing.assert_allclose(np.asarray(kernel.hidden_grad(ones)), np.asarray(copied_kernel.hidden_grad(ones)),
                             atol=1e-5, rtol=1e-5)
  init_cache, step = causal_lm.make_cached_apply(model)
  last, _ = step(model.params, init_cache(3, 12), batch["input_ids"], batch["attention_mask"],
                 causal_lm.positions(batch["attention_mask"]))
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(copied[:, -1]), atol=1e-5, rtol=1e-5)


def test_gguf_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(8 * 2 * 4 * 5, dtype=np.float32).reshape(8 * 2 * 4 // 2, -1)  # [heads*head_dim, in]
  for heads in (1, 2, 4):
    permuted = gguf_import.permute_rows(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_import.unpermute_rows(permuted, heads), w)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_kv_cache_equals_generation_without(arch):
  model = _tiny(arch)
  targets = lora.find_targets(model.params, TARGETS[arch])
  tree = lora.init_kaiming(jax.random.PRNGKey(3), targets, rank=4)
  tree = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(4), x.shape), tree)
  ids = jax.random.randint(jax.random.PRNGKey(5), (3, 10), 3, 97)
  mask = jnp.ones_like(ids).at[0, :4].set(0).at[2, :7].set(0)  # left padding of different lengths
  ids = jnp.where(mask == 1, ids, 0)
  kwargs = dict(lora_scale=2.0, max_new_tokens=8, eos_id=-1, pad_id=0)
  cached = generation.make_generate(model, use_cache=True, **kwargs)(model.params, tree, ids, mask)
  uncached = generation.make_generate(model, use_cache=False, **kwargs)(model.params, tree, ids, mask)
  assert cached.shape == (3, 8)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  # A left-padded row generates what it would alone, unpadded.
  alone = generation.make_generate(model, use_cache=True, **kwargs)(model.params, tree, ids[2:, 7:], mask[2:, 7:])
  np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(cached[2]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_forms_only_the_last_positions_logits(arch):
  """The cached decoder's prompt pass never holds [batch, prompt, vocab] logits (660 MB at SmolLM2's vocabulary
  for 50 prompts of 67 tokens): greedy decoding reads the last position only."""
  model = _tiny(arch)
  ids = jnp.ones((3, 10), jnp.int32)
  vocab = model.hf_config.vocab_size
  hlo = generation.make_generate(model, 1.0, 4, eos_id=-1, pad_id=0).lower(model.params, {}, ids, ids).as_text()
  assert f"3x10x{vocab}xf32" not in hlo
  assert f"3x1x{vocab}xf32" in hlo


def test_generation_stops_at_eos_and_pads_after():
  model = _tiny("llama")
  ids = jax.random.randint(jax.random.PRNGKey(6), (2, 6), 3, 97)
  mask = jnp.ones_like(ids)
  free = generation.make_generate(model, 1.0, 6, eos_id=-1, pad_id=0)(model.params, {}, ids, mask)
  eos = int(free[0, 2])  # make the third generated token of row 0 the EOS
  stopped = generation.make_generate(model, 1.0, 6, eos_id=eos, pad_id=0)(model.params, {}, ids, mask)
  first = list(np.asarray(stopped[0])).index(eos)
  assert first <= 2 and all(int(t) == 0 for t in np.asarray(stopped[0, first + 1:]))
