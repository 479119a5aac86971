"""Which graphs a build compiles (build/pipeline.py), decided before any work."""

import dataclasses

import pytest

from suite_support import FIXTURE
from qwen3_aot.build.pipeline import SMALL_BATCH_BELOW_HIDDEN, wants_small_batch_graph
from qwen3_aot.cli import build_parser
from qwen3_aot.config import Qwen3Config


@pytest.mark.parametrize("hidden, option, want", [
    (1024, None, True), (SMALL_BATCH_BELOW_HIDDEN - 1, None, True),  # narrow models: by default
    (SMALL_BATCH_BELOW_HIDDEN, None, False), (5120, None, False),    # where it never won: not by default
    (5120, True, True), (1024, False, False),                        # what the user asks for
])
def test_the_small_batch_graph_is_built_by_default_for_narrow_models_only(hidden, option, want):
    cfg = dataclasses.replace(Qwen3Config.from_checkpoint(FIXTURE), hidden_size=hidden)
    assert wants_small_batch_graph(option, cfg, "cuda", None, ("pt2",)) is want


@pytest.mark.parametrize("device, tensor_parallel, formats", [("cpu", None, ("pt2",)), ("cuda", 2, ("pt2",)),
                                                              ("cuda", None, ("onnx",))])
def test_no_small_batch_graph_off_cuda_for_tensor_parallel_or_without_pt2(device, tensor_parallel, formats):
    cfg = Qwen3Config.from_checkpoint(FIXTURE)
    assert not wants_small_batch_graph(True, cfg, device, tensor_parallel, formats)


@pytest.mark.parametrize("flags, want", [([], None), (["--small-batch-graph"], True),
                                         (["--no-small-batch-graph"], False)])
def test_export_flags_choose_the_small_batch_graph(flags, want):
    assert build_parser().parse_args(["export", "ckpt", "-o", "art", *flags]).small_batch_graph is want
