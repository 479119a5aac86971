"""Settle DESIGN.md's open risk: can this machine load and run an AOTInductor package?

Builds three tiny packages in parallel child processes (a Linear with its weights
inside the .so, the same with weights outside it, and a `triton_op` that writes a
cache passed in as an input), then loads each in a fresh process with each loader
entry point, so that a segfault kills one probe and not the report. Prints one
row per (package, loader): ok / error / crashed (signal), with timings.

    PYTHONPATH=src python bench/aoti_probe.py --device cuda --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

D = 64


def _cache_write_op():
    """A triton_op that scatters rows into a cache passed in (the KV-cache pattern)."""
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _kernel(cache_ptr, slot_ptr, val_ptr, DIM: tl.constexpr):
        i = tl.program_id(0)
        slot = tl.load(slot_ptr + i)
        offs = tl.arange(0, DIM)
        tl.store(cache_ptr + slot * DIM + offs, tl.load(val_ptr + i * DIM + offs))

    @triton_op("probe::cache_write", mutates_args={"cache"})
    def cache_write(cache: torch.Tensor, slots: torch.Tensor, vals: torch.Tensor) -> None:
        wrap_triton(_kernel)[(vals.shape[0],)](cache, slots, vals, DIM=vals.shape[1])

    @cache_write.register_kernel("cpu")
    def _(cache, slots, vals):
        cache[slots] = vals

    return torch.ops.probe.cache_write


class Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x)


class CacheWriter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(D, D)

    def forward(self, x, slots, cache):
        vals = self.proj(x)
        torch.ops.probe.cache_write(cache, slots, vals)
        return vals + 1


def build(kind: str, device: str, out: Path) -> dict:
    torch.manual_seed(0)
    if kind == "cache":
        _cache_write_op()
        if device == "cpu":
            torch._functorch.config.decompose_custom_triton_ops = False
    model = (CacheWriter() if kind == "cache" else Lin()).to(device).eval()  # lin, ext, noisa: a Linear
    T = torch.export.Dim("T", min=2, max=4096)
    x = torch.randn(8, D, device=device)
    if kind == "cache":
        S = torch.export.Dim("S", min=16, max=1 << 20)
        args = (x, torch.arange(8, device=device), torch.zeros(64, D, device=device))
        dyn = {"x": {0: T}, "slots": {0: T}, "cache": {0: S}}
    else:
        args, dyn = (x,), {"x": {0: T}}
    opts = {"aot_inductor.package_constants_in_so": kind != "ext"}
    if kind == "noisa":  # no -mavx512/-mamx flags in the wrapper's host code
        opts["cpp.vec_isa_ok"] = False
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(model, args, dynamic_shapes=dyn)
        t1 = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(out / f"{kind}.pt2"), inductor_configs=opts
        )
    t2 = time.perf_counter()
    from safetensors.torch import save_file
    save_file(model.state_dict(), out / f"{kind}.safetensors")
    src_hits = {}
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        for n in names:
            if n.endswith((".cpp", ".h", ".py", ".json")):
                text = z.read(n).decode(errors="replace")
                for needle in ("clone_preserve_strides", "aoti_torch_copy_", "probe::cache_write"):
                    if needle in text:
                        src_hits.setdefault(n, []).append(needle)
    return {"kind": kind, "export_s": t1 - t0, "compile_s": t2 - t1, "files": names, "src_hits": src_hits}


LOAD = r"""
import faulthandler, sys, time, json, torch
faulthandler.enable()
kind, how, device, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, sys.argv[5]); import aoti_probe as p
if kind == "cache":
    p._cache_write_op()
path = f"{out}/{kind}.pt2"
res = {}
t0 = time.perf_counter()
if how == "device_info":
    from torch._inductor.codecache import get_device_information
    res["info"] = get_device_information(device)
elif how in ("dlopen", "runner"):
    import ctypes, glob, zipfile, tempfile
    d = tempfile.mkdtemp()
    zipfile.ZipFile(path).extractall(d)
    so = glob.glob(f"{d}/**/*.so", recursive=True)[0]
    res["so"] = so
    if how == "dlopen":
        ctypes.CDLL(so)
    else:
        import os
        R = torch._C._aoti.AOTIModelContainerRunnerCuda if device == "cuda" else torch._C._aoti.AOTIModelContainerRunnerCpu
        runner = R(so, 1, "cuda", os.path.dirname(so)) if device == "cuda" else R(so, 1)
        res["fqn_map"] = runner.get_constant_names_to_original_fqns()
        class M:
            def get_constant_fqns(self): return list(res["fqn_map"].values())
            def load_constants(self, sd, check_full_update, user_managed):
                inv = {v: k for k, v in res["fqn_map"].items()}
                runner.update_constant_buffer({inv[k]: v for k, v in sd.items()}, False, check_full_update, user_managed)
            def __call__(self, *xs): return runner.run(list(xs))[0]
        m = M()
elif how == "aoti_load_package":
    m = torch._inductor.aoti_load_package(path)
elif how == "aoti_load_package_single":
    m = torch._inductor.aoti_load_package(path, run_single_threaded=True)
else:
    from torch._inductor.package.package import AOTICompiledModel
    m = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", how == "direct_single", 1, -1))
res["load_s"] = time.perf_counter() - t0
if how not in ("device_info", "dlopen"):
    torch.manual_seed(0)
    ref = p.CacheWriter() if kind == "cache" else p.Lin()
    from safetensors.torch import load_file
    ref.load_state_dict(load_file(f"{out}/{kind}.safetensors"))
    ref = ref.to(device).eval()
    if kind == "ext":
        res["fqns"] = m.get_constant_fqns()
        sd = {k: v.to(device) for k, v in ref.state_dict().items()}
        m.load_constants({k: sd[k] for k in res["fqns"]}, check_full_update=True, user_managed=True)
    x = torch.randn(37, p.D, device=device)
    with torch.no_grad():
        if kind == "cache":
            cache = torch.full((128, p.D), float("nan"), device=device)
            slots = torch.randperm(128, device=device)[:37]
            y = m(x, slots, cache)
            exp = ref.proj(x)
            res["write_landed"] = bool(torch.allclose(cache[slots], exp, atol=1e-4))
            res["max_err"] = float((y - (exp + 1)).abs().max())
        else:
            y = m(x)
            res["max_err"] = float((y - ref(x)).abs().max())
        if device == "cuda" and how.endswith("single"):
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                m(x) if kind != "cache" else m(x, slots, cache)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                yg = m(x) if kind != "cache" else m(x, slots, cache)
            g.replay(); torch.cuda.synchronize()
            res["graph_ok"] = bool(torch.equal(yg, y))
print("RESULT" + json.dumps(res))
"""


def load_in_child(kind: str, how: str, device: str, out: Path, timeout: int) -> dict:
    cmd = [sys.executable, "-c", LOAD, kind, how, device, str(out), str(Path(__file__).parent)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": timeout}
    row = {"wall_s": time.perf_counter() - t0, "rc": r.returncode}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT"):
            row.update(json.loads(line[6:]))
    row["status"] = "ok" if r.returncode == 0 else (f"signal {-r.returncode}" if r.returncode < 0 else "error")
    if r.returncode != 0:
        row["stderr_tail"] = r.stderr[-3000:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("/tmp/aoti_probe"))
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--only", default="lin,ext,cache")
    ap.add_argument("--hows", default="device_info,aoti_load_package,aoti_load_package_single,direct,direct_single")
    ap.add_argument("--gdb", action="store_true", help="also run a loader of the first package under cuda-gdb")
    ap.add_argument("--gdb-how", default="runner")
    ap.add_argument("--build-one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.build_one:
        print("BUILD" + json.dumps(build(a.build_one, a.device, a.out)))
        return
    env = {k: os.environ.get(k) for k in ("CXX", "CC", "CUDA_HOME", "LD_LIBRARY_PATH")}
    print("torch", torch.__version__, "cuda", torch.version.cuda, "env", env, flush=True)
    if a.device == "cuda":
        print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability(), flush=True)
    kinds = a.only.split(",")
    def build_env(kind: str) -> dict:
        env = dict(os.environ)
        if kind == "sysgxx":  # the system compiler instead of $CXX
            env["CXX"] = next((c for c in ("/usr/bin/g++", "/usr/bin/clang++") if Path(c).exists()), "g++")
        return env

    procs = {k: subprocess.Popen([sys.executable, __file__, "--device", a.device, "--out", str(a.out), "--build-one", k],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=build_env(k))
             for k in kinds}
    report = {"torch": torch.__version__, "builds": {}, "loads": []}
    for k, pr in procs.items():
        so, se = pr.communicate()
        b = [json.loads(l[5:]) for l in so.splitlines() if l.startswith("BUILD")]
        report["builds"][k] = b[0] if b else {"error": se[-3000:]}
        print("build", k, {x: y for x, y in report["builds"][k].items() if x != "files"}, flush=True)
    hows = a.hows.split(",")
    for k in kinds:
        if "error" in report["builds"][k]:
            continue
        for how in hows:
            row = load_in_child(k, how, a.device, a.out, timeout=240)
            row.update(kind=k, how=how)
            report["loads"].append(row)
            print("load", {x: y for x, y in row.items() if x != "stderr_tail"}, flush=True)
            if "stderr_tail" in row:
                print(row["stderr_tail"], flush=True)
    if a.gdb and "error" not in report["builds"][kinds[0]]:
        cmd = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 30", "-ex", "x/4i $pc", "-ex", "info registers", "--args", sys.executable,
               "-c", LOAD, kinds[0], a.gdb_how, a.device, str(a.out), str(Path(__file__).parent)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            text = r.stdout + r.stderr
            report["gdb"] = text[text.find("received signal") - 200:][:12000]
        except Exception as e:  # noqa: BLE001 - a probe reports whatever happened
            report["gdb"] = repr(e)
        print("---- cuda-gdb ----\n" + report["gdb"][:5000], flush=True)
    if a.report:
        a.report.write_text(json.dumps(report, indent=1))
    print("\n%-6s %-26s %-10s %8s %s" % ("pkg", "loader", "status", "load_s", "checks"))
    for r in report["loads"]:
        checks = {k: r[k] for k in ("max_err", "write_landed", "graph_ok") if k in r}
        print("%-6s %-26s %-10s %8.2f %s" % (r["kind"], r["how"], r["status"], r.get("load_s", r.get("wall_s", 0)), checks))


if __name__ == "__main__":
    main()
