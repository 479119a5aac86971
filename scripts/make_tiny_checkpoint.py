"""Train a tiny Qwen3 on CPU and write a Hugging Face checkpoint for tests.

The checkpoint is a test fixture: our reimplementation's greedy continuations are
compared token-for-token with transformers'. A random-weight model has nearly flat
logits, so greedy decoding there is decided by noise-sized margins and an exact
match proves little. A model trained for a few minutes on real English text has
peaked logits with large top-1 margins, so agreement is meaningful.

Like Qwen3-0.6B (layer-0 k_norm: mean 3.6, std 9.1, max 96.5), every layer's
k_norm weight is set to a fixed seeded vector with entries of 100.0 and 50.0 and
frozen, so the fixture exercises the same numerically extreme attention logits.

Training text: the Python documentation topics in the stdlib module ``pydoc_data.topics``
(PSF License v2), truncated to 60 KB so that the model nearly memorizes it in a few minutes,
which is what makes its logits peaked; copied next to the checkpoint as train_text.txt. The
byte-level BPE tokenizer (vocab 512) is trained on the same text. The default 1800 steps take
about 2-4 minutes on 2 CPU cores. Writes SOURCE.md with provenance and stats, then verifies.
"""

import argparse
import json
import platform
import pydoc_data.topics
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TEXT_CHARS = 60_000
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>"]  # ids 0 (bos/pad) and 1 (eos)
SEQ_LEN = 128
BATCH = 16
LR = 1e-2
PROMPT = "The extended form,"  # from the text; no trailing space: byte-level BPE attaches spaces to the next word


def load_text() -> str:
    topics = pydoc_data.topics.topics
    return "\n".join(topics[k] for k in sorted(topics))[:TEXT_CHARS]


def train_tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def make_model(seed: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=0, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        k_norm = layer.self_attn.k_norm.weight
        w = 0.5 + 4.5 * torch.rand(k_norm.shape, generator=gen)
        big = torch.randperm(k_norm.numel(), generator=gen)[:2]
        w[big[0]], w[big[1]] = 100.0, 50.0
        with torch.no_grad():
            k_norm.copy_(w)
        k_norm.requires_grad_(False)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=0, do_sample=False)
    return model


def train(model: Qwen3ForCausalLM, ids: torch.Tensor, steps: int, seed: int) -> float:
    """AdamW; LR warmup over 5% of steps, constant, linear decay to 0 over the last 20%.

    Returns the mean loss of the last 50 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = lambda s: min(1.0, (s + 1) / (0.05 * steps), (steps - s) / (0.2 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed + 2)
    losses: list[float] = []
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        batch = ids[torch.randint(0, len(ids) - SEQ_LEN, (BATCH, 1), generator=gen) + torch.arange(SEQ_LEN)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            recent = losses[-100:]
            elapsed = time.time() - start
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  elapsed {elapsed:6.1f}s", flush=True)
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


def unigram_entropy(ids: torch.Tensor) -> float:
    p = torch.bincount(ids).double() / len(ids)
    return float(-(p * p.log()).nan_to_num().sum())


def greedy_sample(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast) -> tuple[str, float]:
    """Greedy 32-token continuation of PROMPT; returns (decoded text, smallest top-1/top-2 logit margin)."""
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tok.decode(out.sequences[0]), min(margins)


def k_norm_stats(model: Qwen3ForCausalLM) -> list[dict[str, float]]:
    fns = {"mean": torch.mean, "std": torch.std, "min": torch.min, "max": torch.max}
    weights = [layer.self_attn.k_norm.weight.detach() for layer in model.model.layers]
    return [{k: round(float(f(w)), 4) for k, f in fns.items()} for w in weights]


def write_source_md(out: Path, args: argparse.Namespace, info: dict) -> None:
    rows = (f"| {i} | {s['mean']} | {s['std']} | {s['min']} | {s['max']} |" for i, s in enumerate(info["k_norm"]))
    (out / "SOURCE.md").write_text(f"""# tiny-qwen3 test fixture

A 4-layer Qwen3 (hidden 64, 4 heads / 2 KV heads, head_dim 32, vocab {VOCAB_SIZE}, float32)
trained on CPU so that greedy continuations have large logit margins. Generated by
`scripts/make_tiny_checkpoint.py`; regenerate with:

    python scripts/make_tiny_checkpoint.py --out {args.out} --steps {args.steps} --seed {args.seed}

## Training text

`train_text.txt`: the values of `pydoc_data.topics.topics` (Python {platform.python_version()} standard
library) joined with "\\n" in sorted key order, first {TEXT_CHARS} characters. This is the Python
documentation, licensed under the PSF License Version 2 (https://docs.python.org/3/license.html).
It is kept small so that the model nearly memorizes it: continuations of prompts taken from it
have large top-1/top-2 logit margins (end prompts before a space, not with one: the tokenizer
attaches spaces to the following word).

## Training

- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},
  tokenizers {tokenizers.__version__}; 2 CPU threads
- seed {args.seed}; {args.steps} steps of AdamW (peak lr {LR}, warmup / constant / linear decay),
  batch {BATCH} x {SEQ_LEN} tokens, {info["seconds"]:.0f} s
- final training loss (mean of last 50 steps): {info["loss"]:.4f} nats/token
- unigram entropy of the tokenized text: {info["unigram"]:.4f} nats/token
- greedy 32-token continuation (transformers `generate`), prompt included, smallest top-1/top-2 logit margin
  {info["margin"]:.3f}: {info["sample"]!r}

## k_norm (set to a seeded vector with one 100.0 and one 50.0 entry per layer, frozen)

| layer | mean | std | min | max |
|---|---|---|---|---|
{chr(10).join(rows)}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/tiny-qwen3"))
    parser.add_argument("--steps", type=int, default=1800, help="training steps (the LR schedule spans exactly these)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    text = load_text()
    raw_tok = train_tokenizer(text)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw_tok, bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0],
                                  eos_token=SPECIAL_TOKENS[1], model_max_length=512)
    ids = torch.tensor(raw_tok.encode(text).ids)
    model = make_model(args.seed)
    start = time.time()
    loss, seconds = train(model, ids, args.steps, args.seed), time.time() - start
    sample, margin = greedy_sample(model, tok)
    print(f"sample: {sample!r}\nsmallest logit margin: {margin:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    config_path = args.out / "tokenizer_config.json"  # the generic class name, also understood by transformers 4.x
    tok_config = json.loads(config_path.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    config_path.write_text(json.dumps(tok_config, indent=2))
    (args.out / "train_text.txt").write_text(text, encoding="utf-8")
    info = {"seconds": seconds, "loss": loss, "unigram": unigram_entropy(ids), "sample": sample, "margin": margin,
            "k_norm": k_norm_stats(model)}
    write_source_md(args.out, args, info)

    reloaded, reloaded_tok = Qwen3ForCausalLM.from_pretrained(args.out), AutoTokenizer.from_pretrained(args.out)
    stats = k_norm_stats(reloaded)
    assert all(s["max"] >= 96.5 for s in stats), stats
    assert greedy_sample(reloaded, reloaded_tok)[0] == sample, "reloaded checkpoint generates differently"
    probe = "naïve café — 日本語 🐍\n\ttabs"
    assert reloaded_tok.decode(reloaded_tok(probe)["input_ids"]) == probe, "UTF-8 does not round-trip"
    files = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "SOURCE.md", "train_text.txt"}, files
    assert files["model.safetensors"] < 2_000_000 and sum(files.values()) < 2_500_000, files
    print(json.dumps({"files": files, "loss": loss, "unigram_entropy": info["unigram"], "k_norm": stats}, indent=1))


if __name__ == "__main__":
    main()
