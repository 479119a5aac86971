"""What torch offers for a block-scaled FP8 GEMM on sm_90, before we build on it (issue 32).

Our Triton GEMM with 1x128 activation and 128x128 weight scales runs at 0.4-0.6x of cuBLAS's
bf16 at 512 rows on an H100 (BENCHMARKS.md "FP8 weights"). torch 2.9+ gives `torch._scaled_mm`
block scales through cuBLASLt 12.9+ on sm_90 (PyTorch PR #158037: activation scales [M, K/128]
column-major, weight scales [N/128, K/128] passed transposed, K/128 a multiple of 4) and 2.10+
`torch.nn.functional.scaled_mm` with scaling recipes; `_scaled_mm` has an AOTInductor C shim.
This probe prints, on the GPU machine: the API and its enum names, the shim's entries, each
call's error against a float32 oracle and its time from a CUDA graph over rotated weights
(beside bf16's) on 8B's projections at 1-2048 rows, and whether a small FP8 linear compiles
through AOTInductor and matches eager. Also (1x128, 1x128) scales, our layout's (a scale per
output row and group), and our Triton GEMM timed beside. Its JSON goes to $OUT/probe.json.

    PYTHONPATH=src python3 bench/fp8_scaled_mm_probe.py          # MS=1,64,512 to narrow; SKIP_AOTI=1
"""
import ctypes, glob, json, os, sys, time, traceback
import torch
import torch.nn.functional as F

OUT = os.environ.get("OUT", "/tmp")
res = {"env": {}, "api": {}, "perf": [], "aoti": {}}
dev = torch.device("cuda")
res["env"] = dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(),
                  cap=torch.cuda.get_device_capability())
try:
    import triton
    res["env"]["triton"] = triton.__version__
except Exception as e:
    res["env"]["triton"] = repr(e)
# cuBLASLt runtime version (the one torch loaded)
try:
    libs = [l for l in open("/proc/self/maps").read().split() if "libcublasLt" in l]
    lib = ctypes.CDLL(libs[0]) if libs else ctypes.CDLL("libcublasLt.so.13")
    lib.cublasLtGetVersion.restype = ctypes.c_size_t
    res["env"]["cublasLt_runtime"] = int(lib.cublasLtGetVersion())
    res["env"]["cublasLt_path"] = libs[0] if libs else None
except Exception as e:
    res["env"]["cublasLt_runtime"] = repr(e)

api = res["api"]
api["F.scaled_mm"] = hasattr(F, "scaled_mm")
for n in ("ScalingType", "SwizzleType"):
    t = getattr(F, n, None)
    api[n] = None if t is None else {"type": str(type(t)), "members": [str(m) for m in (list(t) if hasattr(t, "__iter__") else dir(t)) if not str(m).startswith("_")]}
    if t is not None:
        try:
            api[n + "_values"] = {m.name: int(m.value) for m in t}
        except Exception as e:
            api[n + "_values"] = repr(e)
for op in ("_scaled_mm", "_scaled_mm_v2"):
    try:
        api[op + "_schemas"] = [str(getattr(torch.ops.aten, op).__getattr__(o)._schema) for o in getattr(torch.ops.aten, op).overloads()]
    except Exception as e:
        api[op + "_schemas"] = repr(e)
inc = os.path.join(os.path.dirname(torch.__file__), "include/torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h")
try:
    txt = open(inc).read()
    api["c_shim_cuda_scaled_mm"] = [l.strip()[:200] for l in txt.splitlines() if "scaled_mm" in l]
except Exception as e:
    api["c_shim_cuda_scaled_mm"] = repr(e)
try:
    from torch._inductor.lowering import lowerings
    api["inductor_lowerings"] = {o: (getattr(torch.ops.aten, o).default in lowerings) for o in ("_scaled_mm", "_scaled_mm_v2")}
except Exception as e:
    api["inductor_lowerings"] = repr(e)
print(json.dumps(res["env"], indent=1)); print(json.dumps(api, indent=1)); sys.stdout.flush()

FP8 = torch.float8_e4m3fn


def quant_w(w):  # [N,K] bf16 -> fp8 [N,K], scale [N/128,K/128] fp32 (dequant = q*s)
    N, K = w.shape
    wb = w.float().view(N // 128, 128, K // 128, 128)
    s = wb.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    q = (wb / s[:, None, :, None]).clamp(-448, 448).to(FP8).view(N, K)
    return q, s.contiguous()


def quant_x(x):  # [M,K] -> fp8, scale [M,K/128]
    M, K = x.shape
    xb = x.float().view(M, K // 128, 128)
    s = xb.abs().amax(-1).clamp(min=1e-4) / 448.0
    q = (xb / s[..., None]).clamp(-448, 448).to(FP8).view(M, K)
    return q, s


def ref(xq, xs, wq, ws):
    M, K = xq.shape; N = wq.shape[0]
    xd = (xq.float().view(M, K // 128, 128) * xs[..., None]).view(M, K)
    wd = (wq.float().view(N // 128, 128, K // 128, 128) * ws[:, None, :, None]).view(N, K)
    return xd @ wd.t()


def call_v1(xq, sa_colmajor, wq, ws, fast=False):
    return torch._scaled_mm(xq, wq.t(), scale_a=sa_colmajor, scale_b=ws.t(), out_dtype=torch.bfloat16, use_fast_accum=fast)


def call_v1_rows(xq, sa_colmajor, wq, ws_rows_kn):
    # (1x128, 1x128): weight scales per (output row, group of 128), given as [K/128, N] contiguous
    return torch._scaled_mm(xq, wq.t(), scale_a=sa_colmajor, scale_b=ws_rows_kn, out_dtype=torch.bfloat16)


def call_v2(xq, sa_colmajor, wq, ws):
    ST = F.ScalingType
    a = getattr(ST, "BlockWise1x128", None) or getattr(ST, "Blockwise_1x128")
    b = getattr(ST, "BlockWise128x128", None) or getattr(ST, "Blockwise_128x128")
    return F.scaled_mm(xq, wq.t(), scale_a=sa_colmajor, scale_recipe_a=a,
                       scale_b=ws.t(), scale_recipe_b=b, output_dtype=torch.bfloat16)


def bench(fn_list, iters=50):
    # fn_list: list of zero-arg callables over rotating buffers (defeats L2 reuse)
    for f in fn_list[:3]:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    n = len(fn_list)
    reps = max(1, iters // n)
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fn_list:
                f()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000 / (reps * n))
    return min(ts)


torch.manual_seed(0)
shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
Ms = [int(m) for m in os.environ.get("MS", "1,4,16,64,128,512,2048").split(",")]
for name, (N, K) in shapes.items():
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wq, ws = quant_w(w)
    ncopy = max(2, int(200e6 // (N * K)) + 1)  # >200 MB of fp8 weights rotated
    wqs = [wq.clone() for _ in range(ncopy)]
    wss = [ws.clone() for _ in range(ncopy)]
    nb = max(2, int(200e6 // (2 * N * K)) + 1)
    wbs = [w.clone() for _ in range(nb)]
    for M in Ms:
        row = dict(shape=name, N=N, K=K, M=M)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        xq, xs = quant_x(x)
        sa = xs.t().contiguous().t()
        try:
            out = call_v1(xq, sa, wq, ws)
            r = ref(xq, xs, wq, ws)
            row["v1_relerr"] = float((out.float() - r).norm() / r.norm())
            row["v1_us"] = bench([lambda i=i: call_v1(xq, sa, wqs[i], wss[i]) for i in range(ncopy)])
        except Exception as e:
            row["v1_err"] = repr(e)[:300]
        if name == "gate_up" and M in (64, 512):
            try:
                row["v1_fastacc_us"] = bench([lambda i=i: call_v1(xq, sa, wqs[i], wss[i], True) for i in range(ncopy)])
            except Exception as e:
                row["v1_fastacc_err"] = repr(e)[:200]
        try:
            out2 = call_v2(xq, sa, wq, ws)
            row["v2_matches_v1"] = bool(torch.equal(out2, out)) if "v1_relerr" in row else None
            if "v1_relerr" not in row:
                r = ref(xq, xs, wq, ws)
                row["v2_relerr"] = float((out2.float() - r).norm() / r.norm())
        except Exception as e:
            row["v2_err"] = repr(e)[:300]
        try:
            ws_rows = ws.repeat_interleave(128, dim=0)  # [N, K/128], our layout
            kn = ws_rows.t().contiguous()
            out3 = call_v1_rows(xq, sa, wq, kn)
            r = ref(xq, xs, wq, ws)
            row["v1_rows_relerr"] = float((out3.float() - r).norm() / r.norm())
            kns = [kn.clone() for _ in range(ncopy)]
            row["v1_rows_us"] = bench([lambda i=i: call_v1_rows(xq, sa, wqs[i], kns[i]) for i in range(ncopy)])
            try:  # (1x128, 128x128) from our layout without a copy: every 128th row's scales, a strided view
                out4 = call_v1(xq, sa, wq, ws_rows[::128])
                row["v1_strided_view_matches"] = bool(torch.equal(out4, out))
            except Exception as e:
                row["v1_strided_view_err"] = repr(e)[:200]
            try:
                call_v1_rows(xq, sa, wq, ws_rows.t())
                row["v1_rows_view_ok"] = True
            except Exception as e:
                row["v1_rows_view_err"] = repr(e)[:200]
            del kns
        except Exception as e:
            row["v1_rows_err"] = repr(e)[:300]
        try:
            sys.path.insert(0, "src")
            from qwen3_aot.custom_ops.fp8_linear import fp8_gemm_cublas, fp8_gemm_triton, quantize_groups_triton
            ws_rows = ws.repeat_interleave(128, dim=0).contiguous()
            wsr = [ws_rows.clone() for _ in range(ncopy)]
            row["triton_us"] = bench([lambda i=i: fp8_gemm_triton(x, wqs[i], wsr[i]) for i in range(ncopy)])
            # the op's cuBLAS path as the graph runs it: quantization, block scales from our layout, the GEMM
            row["ours_cublas_us"] = bench([lambda i=i: fp8_gemm_cublas(x, wqs[i], wsr[i]) for i in range(ncopy)])
            row["quant_us"] = bench([lambda: quantize_groups_triton(x)])
            del wsr
        except Exception as e:
            row["triton_err"] = repr(e)[:300]
        row["bf16_us"] = bench([lambda i=i: torch.mm(x, wbs[i].t()) for i in range(nb)])
        print(json.dumps(row)); sys.stdout.flush()
        res["perf"].append(row)
    del wqs, wss, wbs
    torch.cuda.empty_cache()

json.dump(res, open(os.path.join(OUT, "probe.json"), "w"), indent=1)

# ---------------- AOTInductor ----------------
if os.environ.get("SKIP_AOTI"):
    sys.exit(0)


class Lin(torch.nn.Module):
    def __init__(self, wq, ws, v2=False):
        super().__init__()
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)
        self.v2 = v2

    def forward(self, x):
        M, K = x.shape
        xb = x.float().view(M, K // 128, 128)
        s = xb.abs().amax(-1).clamp(min=1e-4) / 448.0
        q = (xb / s[..., None]).clamp(-448, 448).to(FP8).view(M, K)
        sa = s.t().contiguous().t()
        if self.v2:
            return call_v2(q, sa, self.wq, self.ws)
        return call_v1(q, sa, self.wq, self.ws)


N, K = 4096, 4096
w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
wq, ws = quant_w(w)
for tag, v2, cfg in (("v1_default", False, {}), ("v2_default", True, {})):
    d = {}
    try:
        mod = Lin(wq, ws, v2).to(dev)
        x = torch.randn(64, K, device=dev, dtype=torch.bfloat16)
        m = torch.export.Dim("m", min=4, max=4096)
        t0 = time.time()
        ep = torch.export.export(mod, (x,), dynamic_shapes=({0: m},))
        d["export_ops"] = sorted({str(n.target) for n in ep.graph.nodes if "scaled" in str(n.target)})
        pkg = os.path.join("/tmp", f"lin_{tag}.pt2")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"/tmp/ind_{tag}"
        path = torch._inductor.aoti_compile_and_package(ep, package_path=pkg, inductor_configs=cfg)
        d["compile_s"] = round(time.time() - t0, 1)
        run = torch._inductor.aoti_load_package(path)
        for M in (4, 64, 300, 512):
            xx = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            o = run(xx)
            e = mod(xx)
            d[f"M{M}_relerr_vs_eager"] = float((o.float() - e.float()).norm() / e.float().norm())
        # look for what the generated code calls
        srcs = glob.glob(f"/tmp/ind_{tag}/**/*.cpp", recursive=True) + glob.glob(f"/tmp/ind_{tag}/**/*.wrapper.cpp", recursive=True)
        hits = set()
        for sp in srcs:
            for l in open(sp, errors="ignore"):
                if "scaled_mm" in l or "proxy_executor" in l or "call_dispatcher" in l:
                    hits.add(l.strip()[:220])
        d["codegen_hits"] = sorted(hits)[:12]
        d["triton_kernels_with_scaled"] = len([p for p in glob.glob(f"/tmp/ind_{tag}/**/*.py", recursive=True) if "scaled_mm" in open(p, errors='ignore').read()])
    except Exception as e:
        d["error"] = repr(e)[:600]
        d["tb"] = traceback.format_exc()[-1500:]
    print(tag, json.dumps(d, indent=1)); sys.stdout.flush()
    res["aoti"][tag] = d
    json.dump(res, open(os.path.join(OUT, "probe.json"), "w"), indent=1)
