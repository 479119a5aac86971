"""lm-evaluation-harness as a real client: a small multiple-choice task (written here as a local
JSON file) through `local-completions` against the server, and through `hf` on the same fp32
checkpoint: each choice's loglikelihood within 1e-4 and the same accuracy.

lm-eval comes with the test extra (qwen3-aot[eval], which is lm-eval[api,hf]).
"""

from __future__ import annotations

import json
import random

import pytest

from suite_support import FIXTURE, train_text

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

pytest.importorskip("tenacity", reason="lm-eval's API models need its api extra: pip install 'lm-eval[api,hf]'")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs its hf extra: pip install 'lm-eval[api,hf]'")

pytestmark = pytest.mark.xdist_group("tiny_server")  # one pytest-xdist worker starts the tiny server
DOCS = 24


def write_task(folder) -> str:
    """A 4-way multiple-choice task over the fixture's training text: which of four 40-character
    pieces continues a 120-character context (the true one, or pieces from elsewhere)."""
    text = train_text()
    rng = random.Random(0)
    docs = []
    for _ in range(DOCS):
        start = rng.randrange(0, len(text) - 400)
        context, truth = text[start:start + 120], text[start + 120:start + 160]
        others = [text[s:s + 40] for s in (rng.randrange(0, len(text) - 40) for _ in range(3))]
        choices = others[:]
        gold = rng.randrange(4)
        choices.insert(gold, truth)
        docs.append({"context": context, "choices": choices, "gold": gold})
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "continuation.yaml").write_text(
        "task: qwen3_aot_continuation\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    return "qwen3_aot_continuation"


def evaluate(model: str, model_args: str, folder, task: str) -> tuple[float, list[list[float]]]:
    from lm_eval.tasks import TaskManager

    # our task alone: indexing lm-eval's thousands of bundled task YAMLs took most of this test's time
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], device="cpu", batch_size=1,
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                  log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task]["acc,none"], [[r[0][0] for r in s["resps"]] for s in samples]


@pytest.mark.deadline(300)
def test_lm_eval_through_the_server_equals_lm_eval_on_transformers(tiny_server, tmp_path):
    task = write_task(tmp_path)
    served_acc, served = evaluate(
        "local-completions", f"model=tiny,base_url={tiny_server.base}/v1/completions,tokenizer={FIXTURE},"
                             "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1", tmp_path, task)
    hf_acc, hf = evaluate("hf", f"pretrained={FIXTURE},dtype=float32", tmp_path, task)
    assert len(served) == DOCS and all(len(s) == 4 for s in served)
    for a, b in zip(served, hf):
        assert a == pytest.approx(b, abs=1e-4)
    assert served_acc == hf_acc
    assert 0 < hf_acc  # the trained fixture recognises its own text at least sometimes
