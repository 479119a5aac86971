"""`qwen3-aot export | generate | serve`: the command line."""

from __future__ import annotations

import argparse
import sys

from qwen3_aot import __version__
from qwen3_aot.errors import Qwen3AotError


def _export(a: argparse.Namespace) -> None:
    from qwen3_aot.build import GraphLimits, export_artifact

    limits = GraphLimits(block_size=a.block_size, max_num_tokens=a.max_num_tokens, max_num_seqs=a.max_num_seqs,
                         max_model_len=a.max_model_len)
    export_artifact(a.checkpoint, a.output, device=a.device, dtype=a.dtype, force=a.force, limits=limits,
                    formats=tuple(f.strip() for f in a.format.split(",")), check=not a.no_verify,
                    weights=a.weights)


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
    run(a.artifact, host=a.host, port=a.port, api_key=a.api_key, served_model_name=a.served_model_name,
        max_queue=a.max_queue, grace_s=a.grace_period, device=a.device, **options)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen3-aot", description=__doc__)
    ap.add_argument("--version", action="version", version=f"qwen3-aot {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="turn a Qwen3 checkpoint directory into an artifact")
    ex.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    ex.add_argument("-o", "--output", required=True, help="artifact directory to create")
    ex.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is a GPU")
    ex.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default: the checkpoint's dtype")
    ex.add_argument("--format", default="pt2", help="pt2 (AOTInductor), onnx, or pt2,onnx")
    ex.add_argument("--force", action="store_true", help="replace an existing artifact")
    ex.add_argument("--weights", choices=["copy", "link"], default="copy",
                    help="copy: write the weights into the artifact (fused, any --dtype); link: hard-link the "
                         "checkpoint's safetensors (same filesystem, its dtype), fused at load: no second copy")
    ex.add_argument("--block-size", type=int, default=16, help="KV-cache block size (tokens)")
    ex.add_argument("--max-num-tokens", type=int, default=8192, help="most tokens in one step")
    ex.add_argument("--max-num-seqs", type=int, default=1024, help="most sequences in one step")
    ex.add_argument("--max-model-len", type=int, default=0, help="longest sequence (0: the model's)")
    ex.add_argument("--no-verify", action="store_true", help="skip loading the artifact once to check it")
    ex.set_defaults(func=_export)

    ch = sub.add_parser("check", help="verify an artifact in full: its manifest and the sha256 of every byte "
                                      "(a load hashes large weight files once per host and trusts size and mtime after)")
    ch.add_argument("artifact")
    ch.set_defaults(func=_check)

    ge = sub.add_parser("generate", help="generate text from an artifact, streaming")
    ge.add_argument("artifact")
    ge.add_argument("prompt")
    ge.add_argument("--device", default=None)
    ge.add_argument("--format", choices=["pt2", "onnx"], default=None,
                    help="the graph to run (default: pt2 when the artifact has one, else onnx)")
    ge.add_argument("--max-tokens", type=int, default=64)
    ge.add_argument("--temperature", type=float, default=0.0)
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--stop", action="append", default=[])
    ge.add_argument("--ignore-eos", action="store_true")
    ge.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (on CUDA)")
    ge.set_defaults(func=_generate)

    se = sub.add_parser("serve", help="serve an artifact over HTTP with the OpenAI API (needs the serve extra)")
    se.add_argument("artifact")
    se.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    se.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                                                              "artifact directory's name)")
    se.add_argument("--max-num-seqs", type=int, default=None, help="sequences in one batch (the engine's default)")
    se.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: sized by the engine)")
    se.add_argument("--max-queue", type=int, default=1024,
                    help="most requests running or waiting at once; more get HTTP 429")
    se.add_argument("--grace-period", type=float, default=10.0,
                    help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted")
    se.add_argument("--device", default=None)
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
