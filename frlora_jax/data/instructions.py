"""Instruction and conversation records -> token ids with a loss mask on response tokens only.

A record becomes a list of chat messages: either a messages column (OpenAI
{role, content} or ShareGPT {from, value}), or instruction (+ input) and
response columns. Messages are rendered with the tokenizer's chat template, or
an Alpaca-style template when the tokenizer has none. The loss mask is 1 on
exactly the tokens of assistant turns (their end-of-turn marker included, so
the model learns to stop) and 0 on everything the user or system wrote.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

TEMPLATES = ("auto", "chat", "alpaca")
ANSWER_FORMATS = ("none", "letter", "number", "word")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")


@dataclasses.dataclass
class Encoded:
  input_ids: list[list[int]]
  loss_mask: list[list[int]]   # 1 where the token is a response token (a target of the LM loss)
  prompts: list[list[int]]     # the conversation up to the last response, ready for generation
  references: list[str]        # reference text for exact match (last response or reference_field)
  kept: np.ndarray             # row indices of the records that fit max_length


def _message(m) -> dict:
  if isinstance(m, dict) and "role" in m:
    return {"role": str(m["role"]), "content": str(m.get("content") or "")}
  if isinstance(m, dict) and "from" in m:
    role = SHAREGPT_ROLES.get(str(m["from"]).lower())
    if role is None:
      raise ValueError(f"config.data.messages_field: unknown ShareGPT speaker {m['from']!r}; "
                       f"expected one of {sorted(SHAREGPT_ROLES)}.")
    return {"role": role, "content": str(m.get("value") or "")}
  raise ValueError(f"config.data.messages_field: a message must be {{role, content}} or {{from, value}}, got {m!r}.")


def to_messages(columns: dict, d, row: int) -> list[dict]:
  """One record as chat messages ending with the assistant's response."""
  if d.messages_field:
    raw = columns[d.messages_field][row]
    if isinstance(raw, str):
      raw = [{"role": "user", "content": raw}]
    messages = [_message(m) for m in raw]
    if d.response_field:
      messages.append({"role": "assistant", "content": str(columns[d.response_field][row])})
  else:
    user = str(columns[d.instruction_field][row])
    extra = str(columns[d.input_field][row] or "") if d.input_field else ""
    if extra.strip():
      user = f"{user}\n\n{extra}"
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": str(columns[d.response_field][row])}]
  if not messages or messages[-1]["role"] != "assistant":
    raise ValueError(f"Record {row} does not end with an assistant response; set config.data.response_field "
                     f"to the column holding the answer.")
  if d.system_prompt and messages[0]["role"] != "system":
    messages.insert(0, {"role": "system", "content": d.system_prompt})
  return messages


def truncate_user_turns(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
  """Each user turn cut to its first `max_tokens` tokens (data.prompt_max_tokens): a long document's
  opening (a news article's headline and lead) as the prompt, instead of the record being left out."""
  if not max_tokens:
    return messages
  out = []
  for m in messages:
    if m["role"] == "user":
      ids = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
      if len(ids) > max_tokens:
        m = {**m, "content": tokenizer.decode(ids[:max_tokens])}
    out.append(m)
  return out


def use_chat_template(tokenizer, template: str) -> bool:
  has = bool(getattr(tokenizer, "chat_template", None))
  if template == "chat" and not has:
    raise ValueError("config.data.template='chat' but the tokenizer has no chat template; use 'alpaca' or 'auto'.")
  return template == "chat" or (template == "auto" and has)


def _render_alpaca(messages: list[dict], eos: str) -> str:
  text = ALPACA_HEADER
  for m in messages:
    if m["role"] == "system":
      text = m["content"].strip() + "\n\n"
    elif m["role"] == "user":
      text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
    else:
      text += f"{m['content']}{eos}\n\n"
  return text


def render(tokenizer, messages: list[dict], chat: bool, add_generation_prompt: bool) -> str:
  if chat:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  return _render_alpaca(messages, tokenizer.eos_token or "")


def segments(tokenizer, messages: list[dict], chat: bool) -> list[tuple[str, int]]:
  """(text, is_response) pieces whose concatenation is the rendered conversation."""
  pieces, done = [], ""
  for j, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = render(tokenizer, messages[:j], chat, add_generation_prompt=True)
    after = render(tokenizer, messages[:j + 1], chat, add_generation_prompt=False)
    if not before.startswith(done) or not after.startswith(before):
      raise ValueError("The chat template does not render conversations prefix by prefix, so response tokens "
                       "cannot be located; set config.data.template='alpaca'.")
    pieces += [(before[len(done):], 0), (after[len(before):], 1)]
    done = after
  return pieces


def tokenize_segments(tokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
  ids, mask = [], []
  for text, is_response in pieces:
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += tokens
    mask += [is_response] * len(tokens)
  return ids, mask


def encode(tokenizer, columns: dict, d, max_length: int) -> Encoded:
  """Tokenize every record; records longer than max_length are left out (not truncated)."""
  chat = use_chat_template(tokenizer, d.template)
  n = len(next(iter(columns.values())))
  out = Encoded([], [], [], [], np.zeros(0, np.int64))
  kept = []
  for row in range(n):
    messages = truncate_user_turns(tokenizer, to_messages(columns, d, row), d.prompt_max_tokens)
    ids, mask = tokenize_segments(tokenizer, segments(tokenizer, messages, chat))
    if len(ids) > max_length or not any(mask):
      continue
    prompt = tokenizer(render(tokenizer, messages[:-1], chat, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    reference = str(columns[d.reference_field][row]) if d.reference_field else messages[-1]["content"]
    out.input_ids.append(ids)
    out.loss_mask.append(mask)
    out.prompts.append(prompt)
    out.references.append(reference)
    kept.append(row)
  out.kept = np.asarray(kept, np.int64)
  return out


def extract_answer(text: str, answer_format: str) -> str:
  """The answer in a generated or reference text: a choice letter, the last number, or the first word
  (lower-cased, letters and digits only: a class name)."""
  if answer_format == "letter":
    bracketed = re.search(r"\[\s*([A-Ea-e])\s*\]", text)
    if bracketed:
      return bracketed.group(1).upper()
    bare = re.search(r"(?<![A-Za-z])([A-E])(?![A-Za-z])", text)
    return bare.group(1) if bare else ""
  if answer_format == "number":
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not numbers:
      return ""
    value = numbers[-1].replace(",", "").rstrip(".")
    try:
      number = float(value)
    except ValueError:
      return value
    return str(int(number)) if number == int(number) else repr(number)
  if answer_format == "word":
    word = re.search(r"[^\W_]+", text)
    return word.group(0).lower() if word else ""
  return text.strip()


def answered(generated: list[str], references: list[str], answer_format: str) -> float:
  """Fraction of generations that give an answer in the task's form: a letter or a number, or for `word`
  (a class name) one of the words the references answer with."""
  answers = [extract_answer(g, answer_format) for g in generated]
  if answer_format == "word":
    labels = {extract_answer(r, answer_format) for r in references}
    return float(np.mean([a in labels for a in answers])) if answers else 0.0
  return float(np.mean([bool(a) for a in answers])) if answers else 0.0


def exact_match(generated: list[str], references: list[str], answer_format: str) -> float:
  """Fraction of generations whose extracted answer equals the reference's (empty never matches)."""
  hits = [bool(g_ans) and g_ans == extract_answer(r, answer_format)
          for g_ans, r in ((extract_answer(g, answer_format), r) for g, r in zip(generated, references))]
  return float(np.mean(hits)) if hits else 0.0
