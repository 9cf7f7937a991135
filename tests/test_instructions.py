"""Instruction data: response-only loss masks, templates, answer extraction, natural clients, sampling."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import byte_tokenizer, exam_rows, write_jsonl

from frlora_jax import experiment, workloads
from frlora_jax.data import build, instructions, sources


def _fields(**kw):
  d = ml_collections.ConfigDict(dict(messages_field="", instruction_field="", input_field="", response_field="",
                                     reference_field="", template="auto", system_prompt="", prompt_max_tokens=0))
  d.update(kw)
  return d


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_loss_mask_covers_exactly_the_response_tokens(template):
  tok = byte_tokenizer()
  columns = {"q": ["What is 2+2?"], "a": ["It is 4."]}
  enc = instructions.encode(tok, columns, _fields(instruction_field="q", response_field="a", template=template), 512)
  ids, mask = np.array(enc.input_ids[0]), np.array(enc.loss_mask[0])
  response = tok.decode(ids[mask == 1])
  assert response.startswith("It is 4.") and tok.eos_token in response
  assert "What is 2+2?" in tok.decode(ids[mask == 0]) and "It is 4." not in tok.decode(ids[mask == 0])
  # The mask is one contiguous run at the end of the first (and only) assistant turn.
  first = int(np.flatnonzero(mask)[0])
  assert mask[first:].all()
  # The generation prompt is the conversation up to (not including) the response.
  assert enc.prompts[0] == enc.input_ids[0][:first]


def test_multi_turn_masks_every_assistant_turn():
  tok = byte_tokenizer()
  conversation = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                  {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]
  enc = instructions.encode(tok, {"c": [conversation]}, _fields(messages_field="c"), 512)
  ids, mask = np.array(enc.input_ids[0]), np.array(enc.loss_mask[0])
  runs = np.split(ids, np.flatnonzero(np.diff(mask)) + 1)
  masked = [tok.decode(r) for r, m in zip(runs, np.split(mask, np.flatnonzero(np.diff(mask)) + 1)) if m[0] == 1]
  assert [m.replace(tok.eos_token, "").strip() for m in masked] == ["hello", "ciao"]


def test_response_loss_counts_only_masked_positions():
  ids = jnp.array([[5, 6, 7, 8, 9]])
  batch = {"input_ids": ids, "loss_mask": jnp.array([[0, 0, 0, 1, 1]])}
  logits = jnp.zeros((1, 5, 12))
  base = float(workloads.response_loss(logits, batch))
  np.testing.assert_allclose(base, np.log(12), rtol=1e-6)
  # Changing predictions of prompt targets (positions 0, 1 predict tokens 6, 7) leaves the loss alone...
  assert float(workloads.response_loss(logits.at[0, :2, 3].set(9.0), batch)) == pytest.approx(base)
  # ...changing the prediction of a response token (position 2 predicts token 8) does not.
  assert float(workloads.response_loss(logits.at[0, 2, 8].set(3.0), batch)) < base - 0.1


def test_over_long_records_are_left_out_not_truncated():
  tok = byte_tokenizer()
  columns = {"q": ["short", "x" * 400], "a": ["ok", "ok"]}
  enc = instructions.encode(tok, columns, _fields(instruction_field="q", response_field="a"), 128)
  assert enc.kept.tolist() == [0] and len(enc.input_ids) == 1


def test_system_prompt_and_prompt_cut_turn_a_labelled_corpus_into_instructions():
  """A text/label corpus (BBC News) becomes chat records: the task's instruction as the system turn, the
  document's opening as the user turn, the label as the response (the offline NLG demo's recipe)."""
  tok = byte_tokenizer()
  article = "Markets rally. " + "Shares rose sharply on Monday as investors cheered the results. " * 5
  columns = {"text": [article, "Cup final tonight."], "label": ["business", "sports"]}
  d = _fields(instruction_field="text", response_field="label", system_prompt="Which topic? One word.",
              prompt_max_tokens=24)
  enc = instructions.encode(tok, columns, d, 512)
  assert enc.kept.tolist() == [0, 1]  # the long article is cut, not left out
  first, second = (tok.decode(p) for p in enc.prompts)
  assert first.count("Which topic? One word.") == 1 and second.count("Which topic? One word.") == 1
  assert "Markets rally. Shares r" in first and "investors" not in first  # its first 24 byte tokens only
  assert "Cup final tonight." in second  # shorter than the cut: whole
  assert tok.decode(np.array(enc.input_ids[1])[np.array(enc.loss_mask[1]) == 1]).startswith("sports")
  # The system prompt comes first, and every record shares it: the packed rows' shared prefix.
  from frlora_jax.data import batching
  prefix = batching.shared_prefix_length(enc.input_ids, enc.loss_mask)
  assert "Which topic? One word." in tok.decode(enc.input_ids[0][:prefix])
  # Without the options, the same record is left out (longer than max_length) and has no system turn.
  plain = instructions.encode(tok, columns, _fields(instruction_field="text", response_field="label"), 128)
  assert plain.kept.tolist() == [1] and "Which topic" not in tok.decode(plain.prompts[0])


def test_a_record_with_its_own_system_turn_keeps_it():
  tok = byte_tokenizer()
  record = [{"role": "system", "content": "Own rules."}, {"role": "user", "content": "hi"}]
  enc = instructions.encode(tok, {"m": [record], "a": ["yo"]},
                            _fields(messages_field="m", response_field="a", system_prompt="Default rules."), 512)
  assert "Own rules." in tok.decode(enc.prompts[0]) and "Default rules." not in tok.decode(enc.prompts[0])


@pytest.mark.parametrize("text,fmt,expected", [
    ("Sports.", "word", "sports"), (" Tech, surely", "word", "tech"), ("...", "word", ""),
    ("Reasoning... so the answer is [C].", "letter", "C"), ("B. because", "letter", "B"), ("[d]", "letter", "D"),
    ("I think so", "letter", ""), ("The answer is: 1,234", "number", "1234"), ("x = 2.50", "number", "2.5"),
    ("no digits", "number", "")])
def test_extract_answer(text, fmt, expected):
  assert instructions.extract_answer(text, fmt) == expected


def test_answered_counts_answers_in_the_tasks_form():
  assert instructions.answered(["[A]", "no idea", "B"], ["[A]"] * 3, "letter") == pytest.approx(2 / 3)
  # word answers count only when they are one of the references' words (a class name)
  assert instructions.answered(["Sports!", "The article", "tech"], ["sports", "tech", "tech"], "word") \
      == pytest.approx(2 / 3)


def test_exact_match_never_credits_an_empty_answer():
  assert instructions.exact_match(["[A]", "nothing", "[B]"], ["[A]", "[C]", "[C]"], "letter") == pytest.approx(1 / 3)
  assert instructions.exact_match(["", ""], ["", ""], "letter") == 0.0


def test_glob_source_adds_a_group_column(tmp_path):
  for lang, n in (("french", 3), ("german", 2)):
    (tmp_path / f"{lang}-exams-qa").mkdir()
    write_jsonl(tmp_path / f"{lang}-exams-qa" / "samples.jsonl", exam_rows(n))
  columns = sources.load("jsonl", str(tmp_path / "*-exams-qa" / "samples.jsonl"))
  assert columns["group"] == ["french"] * 3 + ["german"] * 2


def test_natural_partition_and_client_sampling_are_deterministic(make_lm_config):
  config = make_lm_config(**{"fl.clients_per_round": 2})
  tok = byte_tokenizer()
  first, second = build(config, tok), build(config, tok)
  assert first.client_names == ["alpha", "beta", "gamma"]
  for a, b in zip(first.client_indices, second.client_indices):
    np.testing.assert_array_equal(a, b)
  rounds = [experiment.sample_clients(config, 3, r).tolist() for r in range(6)]
  assert rounds == [experiment.sample_clients(config, 3, r).tolist() for r in range(6)]
  assert all(len(ids) == 2 for ids in rounds) and len({tuple(ids) for ids in rounds}) > 1
  config.seed = 1
  assert [experiment.sample_clients(config, 3, r).tolist() for r in range(6)] != rounds
