"""`qwen3-aot export | check | generate | serve`: the command line."""

from __future__ import annotations

import argparse
import json
import sys

from qwen3_aot import __version__
from qwen3_aot.config import YARN_EXAMPLE
from qwen3_aot.errors import Qwen3AotError


def _export(a: argparse.Namespace) -> None:
    from qwen3_aot.build import GraphLimits, export

    limits = GraphLimits(block_size=a.block_size, max_num_tokens=a.max_num_tokens, max_num_seqs=a.max_num_seqs,
                         max_model_len=a.max_model_len)
    rope_scaling = None
    if a.rope_scaling is not None:
        try:
            rope_scaling = json.loads(a.rope_scaling)
        except json.JSONDecodeError as e:
            raise Qwen3AotError(f"--rope-scaling is not valid JSON ({e}); write it as '{YARN_EXAMPLE}'.") from e
    export(a.checkpoint, a.output, device=a.device, dtype=a.dtype, force=a.force, limits=limits,
                    formats=tuple(f.strip() for f in a.format.split(",")), check=not a.no_verify,
                    weights=a.weights, tensor_parallel=a.tensor_parallel,
                    small_batch_graph=a.small_batch_graph, rope_scaling=rope_scaling)


def _check(a: argparse.Namespace) -> None:
    from qwen3_aot import manifest

    for line in manifest.check(a.artifact):
        print(line, flush=True)
    print(f"{a.artifact}: every file matches its sha256")


def _generate(a: argparse.Namespace) -> None:
    from qwen3_aot import runtime

    params = runtime.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                                    top_p=a.top_p, seed=a.seed, stop=tuple(a.stop), ignore_eos=a.ignore_eos)
    options = {"cuda_graphs": False} if a.no_cuda_graphs else {}
    engine = runtime.load(a.artifact, device=a.device, format=a.format, **options)
    try:
        print(a.prompt, end="", flush=True)
        for piece in engine.stream(a.prompt, params):
            print(piece, end="", flush=True)
        print()
    finally:
        if isinstance(engine, runtime.Engine):
            engine.close()


def _serve(a: argparse.Namespace) -> None:
    try:
        from qwen3_aot.serve import run
    except ImportError as e:
        raise Qwen3AotError(f"`qwen3-aot serve` needs the serve extra ({e.name} is not installed): "
                            "pip install 'qwen3-aot[serve]'") from e
    options = {k: v for k, v in (("max_num_seqs", a.max_num_seqs), ("num_blocks", a.num_blocks)) if v is not None}
    if a.no_prefix_caching:
        options["prefix_caching"] = False
    run(a.artifact, host=a.host, port=a.port, api_key=a.api_key, served_model_name=a.served_model_name,
        max_queue=a.max_queue, max_request_bytes=a.max_request_bytes, grace_s=a.grace_period, device=a.device,
        engine_process=not a.engine_in_process, **options)


DEFAULT = "(default: %(default)s)"  # argparse fills in the option's default
DEVICE_HELP = ("cpu, cuda or cuda:N (default: a pt2 graph's build device, which it runs on only; "
               "an onnx graph's CUDA provider when there is a GPU, else cpu)")


def _subcommand(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose own --help opens with the summary the command list shows."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen3-aot", description=__doc__)
    ap.add_argument("--version", action="version", version=f"qwen3-aot {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    ex = _subcommand(sub, "export", "turn a Qwen3 checkpoint directory into an artifact")
    ex.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json, *.safetensors, "
                                        "tokenizer files)")
    ex.add_argument("-o", "--output", required=True,
                    help="artifact directory to create (built under a temporary name, renamed once whole)")
    ex.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="the device the artifact will run on (default: cuda when torch sees a GPU, else cpu)")
    ex.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="the dtype of weights and activations (default: the checkpoint's)")
    ex.add_argument("--format", default="pt2",
                    help="pt2 (AOTInductor, paged KV cache), onnx (onnxruntime), or pt2,onnx for both " + DEFAULT)
    ex.add_argument("--force", action="store_true", help="replace an existing artifact at --output")
    ex.add_argument("--weights", choices=["copy", "link"], default="copy",
                    help="copy: write the weights into the artifact (fused, any --dtype); link: hard-link the "
                         "checkpoint's safetensors (same filesystem, its dtype), fused at load: no second copy "
                         + DEFAULT)
    ex.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                    help="split the model over N ranks (GPUs, or CPU processes), each a worker process at load "
                         "holding its heads' shard of the weights and KV cache; N must divide the KV heads. 1 "
                         "builds that worker form with one rank (to check it on one GPU) (default: none, the "
                         "one-process artifact)")
    ex.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens " + DEFAULT)
    ex.add_argument("--max-num-tokens", type=int, default=8192,
                    help="most tokens in one step, prompts and decodes together " + DEFAULT)
    ex.add_argument("--max-num-seqs", type=int, default=1024, help="most sequences in one step " + DEFAULT)
    ex.add_argument("--max-model-len", type=int, default=0,
                    help="longest sequence, prompt and output, in tokens; 0: the model's context, its "
                         "max_position_embeddings or, with rope scaling, the stretched length (YaRN: "
                         "original_max_position_embeddings x factor) " + DEFAULT)
    ex.add_argument("--rope-scaling", default=None, metavar="JSON",
                    help="RoPE scaling replacing config.json's, in its rope_scaling form, e.g. for Qwen3's "
                         f"documented 131,072 tokens '{YARN_EXAMPLE}' (yarn with transformers' fields, or linear); "
                         "recorded in the manifest's model_config (default: the checkpoint's)")
    ex.add_argument("--small-batch-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="on CUDA, also compile the forward's small-batch form, which the engine replays for the "
                         "decode batches it runs faster (a second compile); default: for models of hidden size "
                         "under 4096, where it has won (--no-small-batch-graph: the main graph only)")
    ex.add_argument("--no-verify", action="store_true",
                    help="skip the build's check (the artifact loaded once, its logits measured against the eager "
                         "model's)")
    ex.set_defaults(func=_export)

    ch = _subcommand(sub, "check", "verify an artifact in full: its manifest and the sha256 of every byte "
                                   "(a load hashes large weight files once per host and trusts size and mtime after)")
    ch.add_argument("artifact", help="artifact directory")
    ch.set_defaults(func=_check)

    ge = _subcommand(sub, "generate", "generate text from an artifact, streaming")
    ge.add_argument("artifact", help="artifact directory (from qwen3-aot export)")
    ge.add_argument("prompt", help="text to continue: printed, then the continuation as it streams")
    ge.add_argument("--device", default=None, help=DEVICE_HELP)
    ge.add_argument("--format", choices=["pt2", "onnx"], default=None,
                    help="the graph to run (default: pt2 when the artifact has one, else onnx)")
    ge.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate " + DEFAULT)
    ge.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 for greedy " + DEFAULT)
    ge.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens, 0 for all " + DEFAULT)
    ge.add_argument("--top-p", type=float, default=1.0,
                    help="sample from the fewest most likely tokens whose probability reaches p, 1 for all " + DEFAULT)
    ge.add_argument("--seed", type=int, default=None,
                    help="the sampler's seed, for the same sampled text every run (default: a fresh one)")
    ge.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end the text before this string; repeat for several (default: none)")
    ge.add_argument("--ignore-eos", action="store_true",
                    help="go on past the end-of-sequence token, up to --max-tokens")
    ge.add_argument("--no-cuda-graphs", action="store_true",
                    help="run decode steps without CUDA graphs (on CUDA; slower, for debugging)")
    ge.set_defaults(func=_generate)

    se = _subcommand(sub, "serve", "serve an artifact over HTTP with the OpenAI API (needs the serve extra)")
    se.add_argument("artifact", help="artifact directory (from qwen3-aot export)")
    se.add_argument("--host", default="127.0.0.1", help="address to bind; the default takes loopback only " + DEFAULT)
    se.add_argument("--port", type=int, default=8000, help="TCP port " + DEFAULT)
    se.add_argument("--api-key", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on /v1 (default: no key asked)")
    se.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                                                              "artifact directory's name)")
    se.add_argument("--max-num-seqs", type=int, default=None,
                    help="most sequences in one batch (default: the engine's)")
    se.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: sized by the engine)")
    se.add_argument("--no-prefix-caching", action="store_true",
                    help="compute every prompt whole (default: full blocks of KV already computed for a shared "
                         "prefix are reused)")
    se.add_argument("--max-queue", type=int, default=1024,
                    help="most requests (a prompt times n) running or waiting at once; more get HTTP 429, and "
                         "one request asking for more than this alone gets 400 " + DEFAULT)
    se.add_argument("--max-request-bytes", type=int, default=None, metavar="BYTES",
                    help="largest request body; a larger one gets HTTP 413 before it is read whole (default: 64 "
                         "bytes per token of the artifact's context, at least 4 MiB). Whatever the body, a text "
                         "prompt longer in UTF-8 than the context could hold gets 400 without being tokenized, "
                         "and n (128), prompts per request (2048), chat messages (one per token of the "
                         "context), stop strings (16, 1024 characters each) are bounded")
    se.add_argument("--grace-period", type=float, default=10.0,
                    help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are "
                         "aborted " + DEFAULT)
    se.add_argument("--device", default=None, help=DEVICE_HELP)
    se.add_argument("--engine-in-process", action="store_true",
                    help="run the engine in the server's process (default: a process of its own, so that the "
                         "HTTP side's Python never holds the GIL the engine needs between steps)")
    se.set_defaults(func=_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Qwen3AotError as e:
        print(f"qwen3-aot: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqwen3-aot: {args.command} interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
