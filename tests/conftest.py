"""Fixtures: a tiny random BERT saved as a real HF model dir, and synthetic text data on disk.

Compilation dominates the suite's time (a tiny model's round compiles in ~5 s, runs in ~0.1 s), so
before JAX starts, for this process and every process a test starts (environment variables):
- XLA:CPU compiles at LLVM optimisation level 0 (~20% less wall time on this suite's tests);
- JAX's persistent compilation cache, shared by the pytest-xdist workers and the subprocesses, serves
  a program another test already compiled (tiny configs set client_progress=False for that: a
  program with a host callback is never cached). FRLORA_TEST_XLA_CACHE names the folder.
"""
import csv
import os
import tempfile

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "FRLORA_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), f"frlora_jax_test_xla_cache_{os.getuid()}")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak", "boring"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "cast", "was", "is", "very", "quite", "and", "story"]


def write_tiny_model(folder, arch="bert", num_labels=2, hidden=32, layers=2, heads=2):
  from transformers import BertTokenizerFast
  from frlora_jax import models
  os.makedirs(folder, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  model = models.random_classifier(arch, hidden=hidden, layers=layers, heads=heads, vocab=len(vocab),
                                   num_labels=num_labels, max_positions=130, intermediate=64,
                                   initializer_range=0.3)
  from transformers import FlaxBertForSequenceClassification
  flax_model = FlaxBertForSequenceClassification(model.hf_config, seed=0)
  flax_model.params = model.params
  flax_model.save_pretrained(folder)
  BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
  return folder


def sentiment_rows(n, seed=0, num_labels=2):
  """Sentences whose label is set by their sentiment words, mixed with neutral ones (learnable)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    label = int(rng.integers(num_labels))
    words = list(rng.choice(POSITIVE if label == 1 else NEGATIVE, size=int(rng.integers(2, 5))))
    words += list(rng.choice(NEUTRAL, size=int(rng.integers(2, 6))))
    rows.append({"text": " ".join(rng.permutation(words)), "label": label})
  return rows


def write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  return write_tiny_model(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
  return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(400))


def tiny_config(model_dir, data_path, **overrides):
  """A fast config on the tiny model and a local CSV."""
  from frlora_jax import defaults
  c = defaults.get_config()
  c.model.name = model_dir
  c.data.source, c.data.path = "csv", data_path
  c.data.text_fields, c.data.label_field = ("text",), "label"
  c.data.max_length = 32
  c.fl.num_clients, c.fl.rounds, c.fl.local_steps = 3, 2, 3
  c.fl.executor = "map"
  c.lora.rank, c.lora.alpha = 4, 8.0
  c.optim.batch_size, c.optim.lr = 8, 5e-3
  c.eval_batch_size = 32
  c.checkpoint_every = 1
  c.client_progress = False  # cacheable round programs (module docstring)
  return _override(c, overrides)


def tiny_config_file(path, model_dir, data_path, **fields) -> str:
  """A config file (for subprocesses: train.py, Flower) of `tiny_config` with `fields` ('fl.num_clients': 5, ...)."""
  import textwrap
  tests = os.path.dirname(os.path.abspath(__file__))
  lines = "".join(f"\n        c.{key} = {value!r}" for key, value in fields.items())
  path.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {tests!r})
      from conftest import tiny_config

      def get_config():
        c = tiny_config({model_dir!r}, {str(data_path)!r}){lines}
        return c
      """))
  return str(path)


@pytest.fixture
def make_config(tiny_model_dir, sentiment_csv):
  return lambda **kw: tiny_config(tiny_model_dir, sentiment_csv, **kw)


# ----- causal LMs -----

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LANGUAGES = ["alpha", "beta", "gamma"]


def byte_tokenizer(chat_template=CHATML):
  """A byte-level tokenizer with no merges: 256 byte tokens + ChatML specials (vocab 260)."""
  from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  vocab = {t: i for i, t in enumerate(specials + alphabet)}
  tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|endoftext|>",
                                 eos_token="<|im_end|>", additional_special_tokens=specials[1:],
                                 chat_template=chat_template)


def write_tiny_lm(folder, arch="llama", **shape):
  """A random tiny Llama/GPT-2 saved as an HF Flax dir with the byte tokenizer."""
  from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM
  from frlora_jax import causal_lm
  tokenizer = byte_tokenizer()
  kwargs = dict(hidden=32, layers=2, heads=4, vocab=len(tokenizer), max_positions=256, initializer_range=0.2)
  kwargs.update(shape)
  model = causal_lm.random_causal_lm(arch, **kwargs)
  cls = FlaxLlamaForCausalLM if arch == "llama" else FlaxGPT2LMHeadModel
  flax_model = cls(model.hf_config, _do_init=False)
  flax_model.save_pretrained(folder, params=causal_lm.to_hf_layout(arch, model.params))
  tokenizer.save_pretrained(folder)
  return str(folder)


def exam_rows(n, seed=0):
  """Multiple-choice records in the evals exams-qa layout, with a language column for natural clients."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    answer = int(rng.integers(4))
    options = "\n".join(f"{'ABCD'[j]}. {'yes' if j == answer else 'no'}" for j in range(4))
    rows.append({"input": [{"role": "system", "content": "Answer with [X]."},
                           {"role": "user", "content": f"Which says yes?\n{options}\nAnswer:"}],
                 "ideal": f"[{'ABCD'[answer]}]", "language": LANGUAGES[i % len(LANGUAGES)]})
  return rows


def write_jsonl(path, rows):
  import json
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  return write_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), "llama", kv_heads=2, rope_theta=50000.0)


@pytest.fixture(scope="session")
def exams_jsonl(tmp_path_factory):
  return write_jsonl(tmp_path_factory.mktemp("lmdata") / "exams.jsonl", exam_rows(120))


def tiny_lm_config(model_dir, data_path, **overrides):
  """A fast instruction-tuning config on a tiny causal LM and local JSONL exam questions."""
  c = tiny_config(model_dir, data_path)
  c.data.kind, c.data.source = "instruction", "jsonl"
  c.data.messages_field, c.data.response_field = "input", "ideal"
  c.data.metric, c.data.answer_format, c.data.max_new_tokens = "exact_match", "letter", 4
  c.data.max_length = 128
  c.fl.partition, c.fl.natural_field, c.fl.num_clients = "natural", "language", 3
  c.lora.targets = (r"(q|k|v|o)_proj$", r"(gate|up|down)_proj$", r"c_attn$", r"c_proj$", r"c_fc$")
  c.optim.batch_size = 4
  c.eval_batch_size = 16
  return _override(c, overrides)


def _override(c, overrides):
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def make_lm_config(tiny_llama_dir, exams_jsonl):
  return lambda **kw: tiny_lm_config(tiny_llama_dir, exams_jsonl, **kw)
