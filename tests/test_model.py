"""The separated model against transformers.Qwen3ForCausalLM, float64 as the referee."""

import pytest
import torch

from random_checkpoints import write_random_checkpoint
from suite_support import FIXTURE, rel_err, text_prompts, train_text
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.model import Qwen3ForCausalLM

eager = FlatBatchDriver.of

SEQS = [list(range(3, 40)), [7, 5, 3], list(range(100, 180, 3)), [11] * 20 + [12] * 5]  # 4 lengths, one batch
pytestmark = pytest.mark.xdist_group("test_model")  # one pytest-xdist worker writes the random checkpoint


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("model") / "extreme", seed=1, k_norm_max=120.0)


@pytest.fixture(scope="session", params=["random", "fixture"])
def ckpt(request, random_ckpt):
    return random_ckpt if request.param == "random" else FIXTURE


def hf_model(path, dtype, attn="sdpa"):
    from transformers import Qwen3ForCausalLM as HF

    return HF.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


@torch.inference_mode()
def hf_logits(model, seqs):
    return [model(torch.tensor([s])).logits[0].double() for s in seqs]


def load(ckpt, dtype, device, layers="decoder_layers") -> Qwen3ForCausalLM:
    """The model; layers="small_batch_layers": its small-batch form (the second graph's)."""
    model = Qwen3ForCausalLM.from_pretrained(ckpt, dtype=dtype, device=device)
    model.small_batch = layers == "small_batch_layers"
    return model


LAYERS = ["decoder_layers", "small_batch_layers"]


@pytest.mark.parametrize("layers", LAYERS)
def test_fp32_logits_match_transformers(ckpt, layers, kernel_device):
    ours = eager(load(ckpt, "float32", kernel_device, layers)).logits(SEQS)
    theirs = hf_logits(hf_model(ckpt, torch.float32), SEQS)
    for o, t, s in zip(ours, theirs, SEQS):
        assert o.shape == (len(s), t.shape[-1])
        assert rel_err(o, t) <= 1e-5


def corpus(ckpt, n=48, length=48) -> list[list[int]]:
    """Many sequences: one model's rounding error on a few sequences is dominated by a few
    near-tied attention scores, and two implementations' errors then differ by +-10% at
    random (seen with 4 sequences; transformers' own sdpa and eager differ by 11%). Over
    48 x 48 tokens the aggregate is stable: ours was 13-18% closer to float64."""
    g = torch.Generator().manual_seed(0)
    if ckpt == FIXTURE:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(FIXTURE / "tokenizer.json")).encode(train_text()[:60000]).ids
        return [ids[i:i + length] for i in torch.randint(0, len(ids) - length, (n,), generator=g).tolist()]
    vocab = Qwen3ForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu").config.vocab_size
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


@pytest.fixture(scope="session")
def corpus_float64_logits(ckpt):
    """transformers' float64 logits of the corpus, [sequences x tokens, vocab], computed once per
    checkpoint in one batch (the sequences are of one length: no padding)."""
    with torch.inference_mode():
        logits = hf_model(ckpt, torch.float64, attn="eager")(torch.tensor(corpus(ckpt))).logits
    return logits.flatten(0, 1)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_transformers(ckpt, dtype, layers, kernel_device, corpus_float64_logits):
    seqs = corpus(ckpt)
    exact = corpus_float64_logits
    theirs = torch.cat(hf_logits(hf_model(ckpt, dtype), seqs))
    ours = torch.cat(eager(load(ckpt, dtype, kernel_device, layers)).logits(seqs))
    assert torch.isfinite(ours).all()
    assert rel_err(ours, exact) <= rel_err(theirs, exact)


def test_k_norm_is_extreme(random_ckpt):
    model = Qwen3ForCausalLM.from_pretrained(random_ckpt, dtype="float32", device="cpu")
    assert all(layer.k_norm.max() >= 96.5 for layer in model.layers)
    fixture = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    assert all(layer.k_norm.max() >= 96.5 for layer in fixture.layers)


@torch.inference_mode()
def test_decode_after_prefill_through_paged_cache(random_ckpt, kernel_device):
    """Two sequences: A prefills 10 tokens and then decodes, B joins later with a prefill in the
    same step as A's decode (a mixed batch). Block size 4: both span several blocks."""
    model = Qwen3ForCausalLM.from_pretrained(random_ckpt, dtype="float32", device=kernel_device)
    ref = hf_model(random_ckpt, torch.float32)
    a, b = list(range(20, 36)), list(range(50, 63))
    caches = eager(model, block_size=4).new_kv_cache(num_blocks=12)
    table = torch.tensor([[7, 1, 4, 9], [0, 11, 2, 5]], dtype=torch.int32, device=kernel_device)
    dev = lambda *xs, dt=torch.int64: torch.tensor(xs, dtype=dt, device=kernel_device)  # noqa: E731

    def step(ids, pos, seq):
        n = len(ids)
        return model(dev(*ids), dev(*pos), dev(*seq, dt=torch.int32), table, dev(*range(n)), *caches)

    want_a = hf_logits(ref, [a])[0]
    got = step(a[:10], range(10), [0] * 10)
    assert rel_err(got, want_a[:10]) <= 1e-5
    for p in range(10, 13):  # A decodes alone
        assert rel_err(step([a[p]], [p], [0])[0], want_a[p]) <= 1e-5
    # A decodes at position 13 while B prefills 13 tokens: one mixed step
    got = step([a[13]] + b, [13] + list(range(13)), [0] + [1] * 13)
    assert rel_err(got[0], want_a[13]) <= 1e-5
    assert rel_err(got[1:], hf_logits(ref, [b])[0]) <= 1e-5


def test_greedy_matches_transformers_generate_on_fixture(kernel_device):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    seqs = [tok.encode(p).ids for p in text_prompts([(0, 20), (5000, 20), (31000, 20)])]
    ours = eager(Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device=kernel_device)).generate_greedy(seqs,
                                                                                                          32)
    ref = hf_model(FIXTURE, torch.float32)
    for s, o in zip(seqs, ours):
        want = ref.generate(torch.tensor([s]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(s):]
        assert o == want.tolist()
    assert len({tuple(o) for o in ours}) > 1  # different prompts, different continuations


def test_sequence_too_long_is_refused(random_ckpt):
    from qwen3_aot import Qwen3AotError

    model = Qwen3ForCausalLM.from_pretrained(random_ckpt, dtype="float32", device="cpu")
    with pytest.raises(Qwen3AotError, match="max_position_embeddings"):
        eager(model).logits([[1] * (model.config.max_position_embeddings + 1)])
