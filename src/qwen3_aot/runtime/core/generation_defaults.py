"""The sampling defaults a checkpoint ships in its generation_config.json (copied into every
artifact), as vLLM's `--generation-config auto` reads them: temperature, top_k, top_p, min_p,
repetition_penalty for requests that leave them unset, max_new_tokens as a cap on max_tokens,
and do_sample false meaning greedy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.sampling_params import DEFAULTABLE, SamplingParams

FILE = "generation_config.json"


def generation_defaults(artifact: Path) -> dict[str, Any]:
    """{field: value} for the SamplingParams fields the file sets (see the module docstring),
    plus "max_tokens" when it sets max_new_tokens; {} without the file."""
    path = Path(artifact) / FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Qwen3AotError(f"{path} is not readable JSON ({e}); fix or remove it.") from e
    if not isinstance(config, dict):
        raise Qwen3AotError(f"{path} is not a JSON object; fix or remove it.")
    out = {name: config[name] for name in DEFAULTABLE if config.get(name) is not None}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0  # transformers' greedy search, whatever temperature says
    if config.get("max_new_tokens") is not None:
        out["max_tokens"] = config["max_new_tokens"]
    try:
        SamplingParams(**out)  # each value checked as a request's would be
    except Qwen3AotError as e:
        raise Qwen3AotError(f"{path}: {e} Fix the file, or serve with --generation-config none.") from e
    return out


def describe(defaults: dict[str, Any]) -> str:
    """The defaults for a log line."""
    return ", ".join(f"{k}={v}" for k, v in sorted(defaults.items())) or "none (OpenAI's defaults)"
