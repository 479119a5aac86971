"""Where a CPU artifact's EngineCore runs fast: the same workload stepped in the thread that
loaded the core, and in another thread (as the Engine's loop thread does), with torch's
intra-op threads as they are and with the loading thread's set to 1.

On the 2-core CPU machine (torch 2.13) the core stepped in another thread than the one that
loaded it ran at about half the speed (911 against 1,822 tok/s); loaded and stepped in one
thread, or loaded by a thread whose intra-op pool is 1, it did not. The cause: each thread that
runs parallel work gets an OpenMP team of its own, and with two teams libgomp counts more
threads than cores and stops spinning between parallel regions (with OMP_WAIT_POLICY=PASSIVE
every mode ran at about 950). Since then the Engine builds its core in its loop thread
(runtime/service/loop.py); the "engine" mode measures that (921 -> 1,654 tok/s when it changed).

    PYTHONPATH=src python bench/cpu_threads_probe.py artifacts/tiny
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import workloads  # noqa: E402

from qwen3_aot import runtime  # noqa: E402

MODES = {"engine": "runtime.load's Engine: its loop thread builds the core and steps it",
         "one thread": "load and step in one (non-main) thread",
         "main loads": "load in the main thread, step in another",
         "main loads, 1 thread": "as main loads, the main thread's intra-op threads set to 1 first"}


def run_mode(artifact: str, mode: str) -> float:
    plan = workloads.Plan(workload=(96, 8, 48))
    prompts, params = workloads.workload(plan, 512)
    out: dict = {}

    def step(core: runtime.EngineCore) -> None:
        with torch.inference_mode():
            core.generate(prompts[:8], params[:8])  # warm-up
            t = time.perf_counter()
            tokens = sum(c.output_tokens for c in core.generate(prompts, params))
            out["tok_s"] = tokens / (time.perf_counter() - t)

    if mode == "engine":
        with runtime.load(artifact, verify_files=False) as engine:
            engine.generate(prompts[:8], params[:8])  # warm-up
            t = time.perf_counter()
            tokens = sum(c.output_tokens for c in engine.generate(prompts, params))
            return tokens / (time.perf_counter() - t)
    if mode == "one thread":
        target = lambda: step(runtime.load_core(artifact, verify_files=False))  # noqa: E731
    else:
        if mode == "main loads, 1 thread":
            torch.set_num_threads(1)
        core = runtime.load_core(artifact, verify_files=False)
        threads = torch.get_num_threads() if mode == "main loads" else len(os.sched_getaffinity(0))

        def target() -> None:
            torch.set_num_threads(threads)
            step(core)
    th = threading.Thread(target=target)
    th.start()
    th.join()
    return out["tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--mode", choices=list(MODES), default=None, help="one mode, in this process")
    a = ap.parse_args()
    if a.mode:
        print(f"{run_mode(a.artifact, a.mode):.0f}")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    for mode, what in MODES.items():  # each in a fresh process: thread pools are per process
        p = subprocess.run([sys.executable, __file__, a.artifact, "--mode", mode], capture_output=True, text=True,
                           timeout=600)
        print(f"{mode:22s} {p.stdout.strip().splitlines()[-1] if p.returncode == 0 else 'failed':>8s} tok/s   {what}")


if __name__ == "__main__":
    main()
