"""Tensor parallelism (`export --tensor-parallel N`): one rank graph, N shards of the weights.

Each rank holds whole heads: its q heads and their KV heads (QKV split by rows, that is by
output columns of the matmul), its slice of gate/up, o_proj and down_proj split by input
columns with an all-reduce after each (the partial sums of its heads and its MLP slice), and
one slice of the vocabulary for the embedding (rows outside the slice are zeros, summed by
an all-reduce) and for lm_head (the slices' logits gathered). Norms and the RoPE table are
replicated. N must divide the KV heads: Qwen3 has 8 (0.6B to 32B), so 1, 2, 4 and 8 all work,
and replicating KV heads would buy nothing there.

The collectives are in the compiled graph. On torch 2.13 (CPU, gloo) AOTInductor compiles
`torch.ops._c10d_functional.all_reduce` / `all_gather_into_tensor` + `wait_tensor` into
C-shim calls that name the process group by a string baked into the code
(`aoti_torch_cpu__c10d_functional_all_reduce_(buf, "sum", "qwen3_aot_tp", ...)`), resolved
through c10d's registry at each call; checked by building a two-rank graph and running it
in two gloo processes. So the graph is not cut at the collectives: one compiled forward per
step, as at tp=1. Two things that check found:
- Inductor resolves the group name while compiling (its repro writer asks the group's size),
  so the build registers a FakeProcessGroup of N ranks under GROUP_NAME (`rank_group`); the
  runtime's workers register their real group under the same name.
- A 0-d tensor constant (the rank's first vocabulary id) is inlined into the code with the
  traced rank's value unless `always_keep_tensor_constants` is set, which would make every
  rank compute rank 0's embedding: with it set, the one compiled graph serves every rank,
  each loading its own shard as AOTInductor user-managed constants.
- On CPU our ops are Python calls from the graph, which holds the GIL while it runs
  (`boxed_run`); a tensor Python has seen keeps a Python object, and a gloo thread dropping
  the last reference to one waits for the GIL while the graph waits for that thread's
  collective: a deadlock. So no such tensor may reach a collective, either way: on CPU the
  graph is compiled without buffer reuse (Inductor would otherwise hand a Python op's dead
  output buffer to a collective as its input), and each collective's result is copied before
  anything else sees it (`RankModel._copied`). Without either, the fixture's tp=2 steps hung
  (tests/runtime/forward/test_tensor_parallel_workers.py fails, in its step timeout).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from qwen3_aot.build.aoti import compile_package
from qwen3_aot.build.graph import GraphLimits, export_forward, input_specs
from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM

GROUP_NAME = "qwen3_aot_tp"  # the process group the compiled collectives name
C10D = torch.ops._c10d_functional
# how each weight is split, as the manifest records it (any other tensor is replicated)
SPLITS = {"embed_tokens": "rows (vocabulary)", "lm_head": "rows (vocabulary)",
          "qkv_proj": "rows of q, k and v each (whole heads)", "gate_up_proj": "rows of gate and up each",
          "o_proj": "columns (then all-reduce)", "down_proj": "columns (then all-reduce)"}


def shard_file(rank: int) -> str:
    return f"weights.rank{rank}.safetensors"


def check_degree(cfg: Qwen3Config, n: int) -> None:
    """Refuse a degree that does not split every head, the MLP and the vocabulary evenly."""
    if not isinstance(n, int) or n < 1:
        raise Qwen3AotError(f"--tensor-parallel {n!r} is not allowed: it must be an integer of at least 1.")
    sizes = {"num_key_value_heads": cfg.num_key_value_heads, "num_attention_heads": cfg.num_attention_heads,
             "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}
    uneven = {k: v for k, v in sizes.items() if v % n}
    if uneven:
        fits = [d for d in range(1, cfg.num_key_value_heads + 1) if all(v % d == 0 for v in sizes.values())]
        raise Qwen3AotError(f"--tensor-parallel {n} does not divide this model's "
                            + ", ".join(f"{k} ({v})" for k, v in uneven.items())
                            + f": each rank holds whole KV heads and equal slices. Use one of {fits}.")


def shard_config(cfg: Qwen3Config, n: int) -> Qwen3Config:
    """What one rank's graph sees: its heads, its MLP slice, its vocabulary slice."""
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                               num_key_value_heads=cfg.num_key_value_heads // n,
                               intermediate_size=cfg.intermediate_size // n, vocab_size=cfg.vocab_size // n)


class RankModel(Qwen3ForCausalLM):
    """One rank of an N-way tensor-parallel Qwen3: `config` is the rank's (`shard_config`),
    `full_config` the model's. `vocab_start`, the rank's first vocabulary id, is a tensor
    constant so that one compiled graph serves every rank."""

    def __init__(self, full: Qwen3Config, n: int, dtype: torch.dtype, device: torch.device | str,
                 device_type: str) -> None:
        super().__init__(shard_config(full, n), dtype, device)
        self.full_config, self.tp_size = full, n
        self.register_buffer("vocab_start", torch.zeros((), dtype=torch.int64,
                                                        device="cpu" if str(device) == "meta" else device))
        self.register_buffer("copy_zero", torch.zeros(() if device_type == "cpu" else (0,), dtype=dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.embed_tokens.shape[0]
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < rows)
        x = torch.nn.functional.embedding(local.clamp(0, rows - 1), self.embed_tokens)
        x = torch.where(mine[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.all_reduce(x)  # one rank holds each token's row, the others add zeros: exact

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self._copied(C10D.wait_tensor(C10D.all_reduce(partial, "sum", GROUP_NAME)))

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        rows, part = logits.shape
        stacked = C10D.wait_tensor(C10D.all_gather_into_tensor(logits.contiguous(), self.tp_size, GROUP_NAME))
        return self._copied(stacked.view(self.tp_size, rows, part).permute(1, 0, 2).reshape(rows, self.tp_size * part))

    def _copied(self, t: torch.Tensor) -> torch.Tensor:
        """On CPU, a copy of a collective's result, so that the buffer the process group's work
        holds is never handed to Python (the module docstring says why). Inductor removes a
        `clone`; it cannot remove an add of a constant it does not know (`copy_zero`, kept a
        runtime constant). On CUDA our ops are compiled kernels: no Python, no copy."""
        return t + self.copy_zero if self.copy_zero.numel() else t


def shard_state(model: Qwen3ForCausalLM, n: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors (contiguous copies) of the whole model `model`."""
    cfg = model.config
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out = {}
    for name, t in state.items():
        key = name.rsplit(".", 1)[-1]
        if key in ("embed_tokens", "lm_head"):
            t = t.chunk(n)[rank]
        elif key == "qkv_proj":
            t = torch.cat([p.chunk(n)[rank] for p in t.split([cfg.q_size, cfg.kv_size, cfg.kv_size])])
        elif key == "gate_up_proj":
            t = torch.cat([p.chunk(n)[rank] for p in t.chunk(2)])
        elif key in ("o_proj", "down_proj"):
            t = t.chunk(n, dim=1)[rank]
        out[name] = t.detach().contiguous()
    out["vocab_start"] = torch.tensor(rank * (cfg.vocab_size // n), device=model.device)
    out["copy_zero"] = torch.zeros(() if model.device.type == "cpu" else (0,), dtype=model.dtype, device=model.device)
    return out


def rank_model(model: Qwen3ForCausalLM, n: int, rank: int) -> RankModel:
    """The rank's model, its tensors sharded from `model`'s."""
    rm = RankModel(model.config, n, model.dtype, "meta", model.device.type)
    state = shard_state(model, n, rank)
    rm.cos_sin = state.pop("cos_sin")  # not persistent: load_state_dict does not take it
    rm.load_state_dict(state, strict=True, assign=True)
    return rm.eval()


@contextlib.contextmanager
def rank_group(n: int) -> Iterator[None]:
    """GROUP_NAME registered as a FakeProcessGroup of n ranks while the rank graph is traced and
    compiled: Inductor asks the group's size, nothing communicates."""
    pg = dist.ProcessGroup(dist.HashStore(), 0, n)
    c10d = torch._C._distributed_c10d
    pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.CUSTOM,
                         c10d.FakeProcessGroup._create_internal(0, n, c10d.FakeProcessGroup.Options()))
    c10d._register_process_group(GROUP_NAME, pg)
    try:
        yield
    finally:
        c10d._unregister_process_group(GROUP_NAME)


def build_rank_graph(model: Qwen3ForCausalLM, n: int, limits: GraphLimits, path: Path,
                     device: str) -> tuple[list[dict], dict]:
    """Export and compile rank 0's graph (every rank's: only the constants differ) into `path`;
    returns its input specs (a rank's KV heads) and the build options. The rank's copy of its
    weights is dropped on return: the build holds the whole model and little more."""
    rm = rank_model(model, n, 0)
    inductor = {"always_keep_tensor_constants": True}
    if device == "cpu":  # no Python-seen buffer may become a collective's input (module docstring)
        inductor.update(allow_buffer_reuse=False, inplace_buffers=False)
    with rank_group(n), torch._inductor.config.patch(**inductor):
        options = compile_package(export_forward(rm, limits), path, device)
    options["inductor_configs"].update(inductor)
    return input_specs(rm, limits), options


def write_shards(model: Qwen3ForCausalLM, n: int, tmp: Path) -> dict:
    """Every rank's weights into `tmp` (one file each, made and written one at a time);
    returns the manifest's "tensor_parallel" entry."""
    cfg = model.config
    for r in range(n):
        save_file({k: v.cpu() for k, v in shard_state(model, n, r).items()}, str(tmp / shard_file(r)))
    heads, kv, vocab = cfg.num_attention_heads // n, cfg.num_key_value_heads // n, cfg.vocab_size // n
    return {"size": n, "group_name": GROUP_NAME, "splits": SPLITS,
            "shards": [{"rank": r, "weights": shard_file(r), "q_heads": [r * heads, (r + 1) * heads],
                        "kv_heads": [r * kv, (r + 1) * kv], "vocab": [r * vocab, (r + 1) * vocab]}
                       for r in range(n)]}
