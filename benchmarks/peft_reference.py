"""The reference the causal-LM round is measured against: a PyTorch + PEFT federated round done the
way OpenFedLLM does it, on a random Llama of the given shape, printed as one JSON line.

  python benchmarks/peft_reference.py [--venv DIR] --hidden 576 --layers 30 --heads 9 --kv_heads 3 \\
      --intermediate 1536 --vocab 49152 --tie --seq 256 --bs 4 --clients 4 --steps 4 --rank 16

It installs nothing into the project's environment: on first use it creates its own virtual
environment (default ~/.cache/frlora_jax/peft_reference_venv) with the torch wheel from PyPI
installed without its CUDA dependencies (CPU only), transformers 4.57.6 and peft, then
re-runs itself there.

One round, as OpenFedLLM's main_sft.py: a single PEFT model; per client, load the global LoRA
state (set_peft_model_state_dict), a fresh AdamW over the trainable parameters, `steps` steps
of `bs` rows, read the LoRA state back (get_peft_model_state_dict); then FedAvg of the factors
(equal weights: equal data). Loss on every token, float32, LoRA dropout 0.05 on q_proj, v_proj
(alpha = 2 r). Gradient checkpointing on, as OpenFedLLM runs by default (its config.py:
`gradient_checkpointing=True` into TrainingArguments); `--no-gradient_checkpointing` turns it off
(the figures in benchmarks/README.md before the 2026-12-02 Intel Xeon table ran without it).
The first round is a warm-up; `round_s_median` is over the timed rounds.

With `--examples FILE` (written by `benchmarks/round_time.py --data_config ... --export_examples FILE`)
the rows are real tokenized instruction examples instead: each step draws `bs` of the client's
examples, pads them to the longest in the batch and masks the prompt and padding out of the loss
(labels -100), as OpenFedLLM's SFTTrainer with DataCollatorForCompletionOnlyLM does; the logits
still cover every position. `response_tokens_per_s` counts the trained (response) tokens.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

TORCH, TRANSFORMERS, PEFT = "torch==2.9.1", "transformers==4.57.6", "peft==0.17.1"
# torch's own pure-Python requirements (its nvidia-* CUDA wheels are what --no-deps leaves out)
TORCH_DEPS = ["filelock", "typing-extensions>=4.10", "sympy>=1.13.3", "networkx", "jinja2", "fsspec"]
IN_REFERENCE_VENV = "FRLORA_PEFT_REFERENCE_VENV"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--venv", default=os.path.expanduser("~/.cache/frlora_jax/peft_reference_venv"))
  p.add_argument("--hidden", type=int, default=576)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--kv_heads", type=int, default=3)
  p.add_argument("--intermediate", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--tie", action="store_true")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--bs", type=int, default=4)
  p.add_argument("--clients", type=int, default=4)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the first (warm-up) one")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
  p.add_argument("--examples", default=None, help="JSON of tokenized instruction examples (see above)")
  p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                 help="OpenFedLLM's default (config.py: gradient_checkpointing=True, passed to TrainingArguments): "
                      "Trainer's reentrant checkpointing of every decoder layer; --no-gradient_checkpointing: off")
  return p.parse_args(argv)


def ensure_venv(folder: str) -> str:
  """The reference environment's python, created on first use."""
  python = os.path.join(folder, "bin", "python")
  if not os.path.exists(os.path.join(folder, ".complete")):
    subprocess.check_call([sys.executable, "-m", "venv", folder])
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.check_call(pip + ["--no-deps", TORCH])
    subprocess.check_call(pip + TORCH_DEPS + [TRANSFORMERS, "--no-deps", PEFT])
    subprocess.check_call(pip + ["numpy", "safetensors", "tokenizers>=0.22,<=0.23.0", "huggingface-hub==0.36.2",
                                 "pyyaml", "regex", "requests", "tqdm", "packaging", "psutil", "accelerate"])
    open(os.path.join(folder, ".complete"), "w").close()
  return python


def run(args) -> dict:
  import torch
  from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
  from transformers import LlamaConfig, LlamaForCausalLM
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                       vocab_size=args.vocab, tie_word_embeddings=args.tie,
                       max_position_embeddings=max(2048, args.seq))
  model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
      r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
      task_type="CAUSAL_LM"))
  if args.gradient_checkpointing:  # what Trainer(gradient_checkpointing=True) and main_sft.py set up
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
  generator = torch.Generator().manual_seed(0)
  batches = real_batches(args, generator) if args.examples else synthetic_batches(args, generator)
  global_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

  def one_round():
    uploads, response_tokens = [], 0
    for k in range(args.clients):
      set_peft_model_state_dict(model, global_state)
      optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
      model.train()
      for s in range(args.steps):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        response_tokens += int((batch["labels"][:, 1:] != -100).sum())
      uploads.append({name: v.detach().clone() for name, v in get_peft_model_state_dict(model).items()})
    return {name: sum(u[name] for u in uploads) / len(uploads) for name in uploads[0]}, response_tokens

  t0 = time.perf_counter()
  global_state, _ = one_round()
  first = time.perf_counter() - t0
  # B starts at zero: a nonzero average shows the gradients reached the factors (checkpointing included)
  assert any(bool(v.abs().sum() > 0) for name, v in global_state.items() if "lora_B" in name), "LoRA did not train"
  times, tokens = [], []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    global_state, trained = one_round()
    times.append(time.perf_counter() - t0)
    tokens.append(trained)
  median = sorted(times)[len(times) // 2]
  return {"reference": "pytorch+peft (OpenFedLLM loop)", "torch": torch.__version__,
          "examples": args.examples, "gradient_checkpointing": args.gradient_checkpointing,
          "response_tokens_per_s": round(sum(tokens) / len(tokens) / median, 2),
          "threads": torch.get_num_threads(), "hidden": args.hidden, "layers": args.layers, "seq": args.seq,
          "bs": args.bs, "clients": args.clients, "steps": args.steps, "rank": args.rank,
          "round_s_median": round(median, 3), "round_s_all": [round(t, 3) for t in times],
          "first_round_s": round(first, 3),
          "tokens_per_s": round(args.clients * args.steps * args.bs * args.seq / median, 1) if not args.examples else None,
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def synthetic_batches(args, generator):
  """Full-length random rows, loss on every token (labels = input_ids)."""
  import torch
  while True:
    ids = torch.randint(3, args.vocab, (args.bs, args.seq), generator=generator)
    yield {"input_ids": ids, "labels": ids}


def real_batches(args, generator):
  """Batches of `bs` random examples, right-padded to the batch's longest, prompt and padding out of the loss."""
  import torch
  with open(args.examples) as f:
    data = json.load(f)
  ids, masks, pad_id = data["input_ids"], data["loss_mask"], data["pad_id"]
  while True:
    rows = torch.randint(0, len(ids), (args.bs,), generator=generator).tolist()
    longest = max(len(ids[r]) for r in rows)
    input_ids = torch.full((args.bs, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((args.bs, longest), dtype=torch.long)
    labels = torch.full((args.bs, longest), -100, dtype=torch.long)
    for i, r in enumerate(rows):
      n = len(ids[r])
      input_ids[i, :n] = torch.tensor(ids[r])
      attention[i, :n] = 1
      labels[i, :n] = torch.where(torch.tensor(masks[r]) > 0, torch.tensor(ids[r]), torch.tensor(-100))
    yield {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def main():
  args = parse_args()
  if os.environ.get(IN_REFERENCE_VENV) != "1":
    python = ensure_venv(args.venv)
    env = dict(os.environ, **{IN_REFERENCE_VENV: "1"})
    raise SystemExit(subprocess.call([python, os.path.abspath(__file__), *sys.argv[1:]], env=env))
  print(json.dumps(run(args)))


if __name__ == "__main__":
  main()
