"""Every user-caused error stops before training, naming the field and the fix."""
import json

import pytest

from conftest import sentiment_rows, write_csv
from frlora_jax import experiment


@pytest.mark.parametrize("overrides, message", [
    ({"fl.algorithm": "fedsgd"}, r"config.fl.algorithm='fedsgd' is unknown; use one of .*frlora"),
    ({"fl.executor": "pmap"}, r"config.fl.executor='pmap' is unknown"),
    ({"fl.partition": "shards"}, r"config.fl.partition='shards' is unknown"),
    ({"data.task": "mnli"}, r"config.data.task='mnli' is unknown"),
    ({"fl.dirichlet_beta": 0.0}, r"config.fl.dirichlet_beta=0.0 must be > 0"),
    ({"fl.dirichlet_beta": -1.0}, r"config.fl.dirichlet_beta=-1.0 must be > 0"),
    ({"lora.rank": 64}, r"config.lora.rank=64 is larger than the smaller dimension of LoRA targets"),
    ({"fl.num_clients": 1000}, r"config.fl.num_clients=1000 exceeds the \d+ training examples"),
    ({"data.text_fields": ("sentence",)}, r"config.data.text_fields: column 'sentence' is not in"),
    ({"data.label_field": "target"}, r"config.data.label_field: column 'target' is not in"),
    ({"data.num_labels": 1}, r"outside the task's range \[0, 0\]"),
    ({"lora.targets": ("nothing_here",)}, r"config.lora.targets=\('nothing_here',\) match no 2-D kernel"),
    ({"fl.aggregation": "median"}, r"config.fl.aggregation='median' is unknown"),
    ({"lora.dropout": 1.5}, r"config.lora.dropout=1.5 must be in"),
    ({"model.dropout_bits": 12}, r"config.model.dropout_bits=12 is unknown; use one of 8, 16, 32"),
    ({"fl.algorithm": "ffa_lora", "lora.freeze_a": False},
     r"config.lora.freeze_a=False conflicts with config.fl.algorithm='ffa_lora', which is defined with freeze_a=True"),
    ({"lora.init": "kaiming"}, r"config.lora.init='kaiming' conflicts with config.fl.algorithm='frlora', which is "
                               r"defined with init='pissa'"),
    ({"fl.server_rule": "paper"}, r"config.fl.server_rule='paper' is unknown; use one of textbook, official"),
    ({"fl.algorithm": "fedprox", "fl.prox_mu": -1.0}, r"config.fl.prox_mu=-1.0 must be >= 0"),
    ({"fl.algorithm": "fedreg", "fl.fedreg_mu": -1.0}, r"config.fl.fedreg_mu=-1.0 must be >= 0"),
    ({"optim.schedule": "linear"}, r"config.optim.schedule='linear' is unknown; use one of warmup_cosine, round_cosine"),
])
def test_bad_config_is_refused_with_the_field(make_config, overrides, message):
  with pytest.raises(ValueError, match=message):
    experiment.build(make_config(**overrides))


def test_string_labels_outside_label_names(make_config, tmp_path):
  rows = [{"text": r["text"], "label": ["neg", "pos", "meh"][i % 3]} for i, r in enumerate(sentiment_rows(30))]
  path = write_csv(tmp_path / "three.csv", rows)
  with pytest.raises(ValueError, match=r"labels \['meh'\] .* are not in config.data.label_names"):
    experiment.build(make_config(**{"data.path": path, "data.label_names": ("neg", "pos")}))


def test_empty_data_file(make_config, tmp_path):
  path = tmp_path / "empty.csv"
  path.write_text("text,label\n")
  with pytest.raises(ValueError, match="holds no examples"):
    experiment.build(make_config(**{"data.path": str(path)}))


def test_missing_data_file(make_config, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.path=.* does not exist"):
    experiment.build(make_config(**{"data.path": str(tmp_path / "nope.csv")}))


def test_bad_jsonl_line(make_config, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"text": "good film", "label": 1}) + "\n{not json\n")
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    experiment.build(make_config(**{"data.source": "jsonl", "data.path": str(path)}))


@pytest.mark.parametrize("overrides, message", [
    ({"fl.partition": "dirichlet"}, r"config.fl.partition='dirichlet' needs class labels"),
    ({"data.metric": "accuracy"}, r"config.data.metric='accuracy' is a classification metric"),
    ({"data.answer_format": "none"}, r"'exact_match' needs config.data.answer_format"),
    ({"data.answer_format": "roman"}, r"config.data.answer_format='roman' is unknown"),
    ({"data.messages_field": ""}, r"needs config.data.messages_field, or"),
    ({"data.response_field": "answer"}, r"column\(s\) \['answer'\] are not in"),
    ({"data.max_length": 16}, r"No training record fits config.data.max_length=16"),
    ({"fl.natural_field": "country"}, r"config.fl.natural_field='country' is not a column"),
    ({"data.kind": "chat"}, r"config.data.kind='chat' is unknown"),
    ({"data.pack": 64}, r"config.data.pack=64 is shorter than config.data.max_length=128"),
    ({"data.pack": -1}, r"config.data.pack=-1 must be 0 \(off\) or a row length"),
    ({"data.shared_prefix": True}, r"config.data.shared_prefix=True .* needs config.data.pack"),
    ({"data.pack": 256, "dp.mode": "sample", "dp.noise_multiplier": 1.0},
     r"config.data.pack: sample-level DP .* set config.data.pack=0"),
])
def test_bad_instruction_config_is_refused_with_the_field(make_lm_config, overrides, message):
  with pytest.raises(ValueError, match=message):
    experiment.build(make_lm_config(**overrides))


def test_encoder_checkpoint_for_instruction_data_is_refused(make_lm_config, tiny_model_dir):
  with pytest.raises(ValueError, match=r"is a 'bert' model; causal LM training supports"):
    experiment.build(make_lm_config(**{"model.name": tiny_model_dir}))


def test_algorithm_settings_are_checked_before_any_data_is_read(make_config, tmp_path):
  config = make_config(**{"fl.algorithm": "ffa_lora", "lora.freeze_a": False,
                          "data.path": str(tmp_path / "does_not_exist.csv")})
  with pytest.raises(ValueError, match=r"config.lora.freeze_a=False conflicts"):
    experiment.build(config)
