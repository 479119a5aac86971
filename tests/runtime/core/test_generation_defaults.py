"""The checkpoint's sampling defaults read from generation_config.json, as vLLM's
`--generation-config auto` reads them."""

import json

import pytest

from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.core.generation_defaults import generation_defaults


def defaults_of(tmp_path, config: dict) -> dict:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return generation_defaults(tmp_path)


def test_qwen3s_file_gives_its_sampling_fields_and_nothing_else(tmp_path):
    qwen3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
             "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}
    assert defaults_of(tmp_path, qwen3) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}


def test_do_sample_false_is_greedy_and_max_new_tokens_a_cap(tmp_path):
    d = defaults_of(tmp_path, {"do_sample": False, "temperature": 0.7, "max_new_tokens": 100, "min_p": 0.1,
                               "repetition_penalty": 1.1})
    assert d == {"temperature": 0.0, "min_p": 0.1, "repetition_penalty": 1.1, "max_tokens": 100}
    assert SamplingParams().with_defaults(d).greedy and not SamplingParams(temperature=0.7).with_defaults(d).greedy


def test_no_file_no_defaults_and_a_bad_value_names_the_file(tmp_path):
    assert generation_defaults(tmp_path) == {}
    with pytest.raises(Qwen3AotError, match="generation_config.json.*top_p"):
        defaults_of(tmp_path, {"top_p": 1.5})
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(Qwen3AotError, match="not readable JSON"):
        generation_defaults(tmp_path)
