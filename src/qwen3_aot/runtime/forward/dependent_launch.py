"""Programmatic dependent launch inside a captured CUDA graph, set on its edges after capture.

AOTInductor launches each kernel with a plain cuLaunchKernel, so no launch attribute can ask
for an early start. The graph a capture records can: an edge between two kernel nodes made
programmatic lets the second start once every block of the first has called
``griddepcontrol.launch_dependents`` (or ended), rather than after the first has ended. That is
safe only into a kernel that waits (``griddepcontrol.wait``) before it touches the first one's
data: the kernels the artifact's manifest names (``dependent_kernels``, written by the build from
custom_ops/dependent_launch.py), found here by name. Every other edge stays as captured.

The driver calls are CUDA 12.3's (edges with data); where the driver lacks them, nothing changes.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("qwen3_aot")

_KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
_PROGRAMMATIC = 1  # CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC, and CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
_EDGE_DATA_VERSION = 12030  # the CUDA version whose graph edge calls take CUgraphEdgeData


class _EdgeData(ctypes.Structure):
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class _KernelNodeParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p)] + [(f, ctypes.c_uint) for f in (
        "gridDimX", "gridDimY", "gridDimZ", "blockDimX", "blockDimY", "blockDimZ", "sharedMemBytes")] + [
        ("kernelParams", ctypes.c_void_p), ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p)]


class _Driver:
    """The few driver entry points needed, at the versions whose signatures are written here."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuGetProcAddress_v2.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                            ctypes.c_uint64, ctypes.POINTER(ctypes.c_int)]
        p, vp, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)
        edges = ctypes.POINTER(_EdgeData)
        self.node_type = self._entry(lib, "cuGraphNodeGetType", [p, ctypes.POINTER(ctypes.c_int)])
        self.kernel_params = self._entry(lib, "cuGraphKernelNodeGetParams", [p, ctypes.POINTER(_KernelNodeParams)],
                                         version=12000)
        self.func_name = self._entry(lib, "cuFuncGetName", [ctypes.POINTER(ctypes.c_char_p), p])
        self.get_edges = self._entry(lib, "cuGraphGetEdges", [p, vp, vp, edges, size_p])
        self.remove_edges = self._entry(lib, "cuGraphRemoveDependencies", [p, vp, vp, edges, ctypes.c_size_t])
        self.add_edges = self._entry(lib, "cuGraphAddDependencies", [p, vp, vp, edges, ctypes.c_size_t])

    @staticmethod
    def _entry(lib: ctypes.CDLL, name: str, argtypes: list, version: int = _EDGE_DATA_VERSION):
        fn = ctypes.c_void_p()
        status = ctypes.c_int()
        if lib.cuGetProcAddress_v2(name.encode(), ctypes.byref(fn), version, 0, ctypes.byref(status)) != 0 \
                or not fn.value:
            raise OSError(f"the CUDA driver has no {name} of CUDA {version // 1000}.{version % 1000 // 10}")
        return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(fn.value)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")


def _driver() -> _Driver | None:
    global _DRIVER
    if _DRIVER is None:
        try:
            _DRIVER = _Driver()
        except OSError as e:
            log.info("programmatic dependent launch off: %s", e)
            _DRIVER = False
    return _DRIVER or None


_DRIVER: _Driver | bool | None = None


def link_dependents(graph: torch.cuda.CUDAGraph, kernels: tuple[str, ...]) -> int:
    """Make programmatic every kernel -> kernel edge of the captured, not yet instantiated
    `graph` (made with keep_graph=True) whose second kernel's name starts with one of `kernels`;
    their count."""
    drv = _driver() if kernels else None
    if drv is None:
        return 0
    g = ctypes.c_void_p(graph.raw_cuda_graph())
    count = ctypes.c_size_t()
    _check(drv.get_edges(g, None, None, None, ctypes.byref(count)), "cuGraphGetEdges")
    n = count.value
    src, dst, data = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (_EdgeData * n)()
    _check(drv.get_edges(g, src, dst, data, ctypes.byref(count)), "cuGraphGetEdges")
    names: dict[int, str | None] = {}
    picked = [i for i in range(n) if data[i].type == 0 and _kernel_name(drv, src[i], names) is not None
              and (_kernel_name(drv, dst[i], names) or "").startswith(kernels)]
    if not picked:
        return 0
    k = len(picked)
    frm, to = (ctypes.c_void_p * k)(*[src[i] for i in picked]), (ctypes.c_void_p * k)(*[dst[i] for i in picked])
    old = (_EdgeData * k)(*[data[i] for i in picked])
    new = (_EdgeData * k)(*[_EdgeData(_PROGRAMMATIC, 0, _PROGRAMMATIC) for _ in picked])
    _check(drv.remove_edges(g, frm, to, old, k), "cuGraphRemoveDependencies")
    _check(drv.add_edges(g, frm, to, new, k), "cuGraphAddDependencies")
    return k


def _kernel_name(drv: _Driver, node: int | None, names: dict[int, str | None]) -> str | None:
    """The node's kernel name, None for a node that is not a kernel launched by a CUfunction."""
    if node not in names:
        kind = ctypes.c_int()
        _check(drv.node_type(ctypes.c_void_p(node), ctypes.byref(kind)), "cuGraphNodeGetType")
        name = None
        if kind.value == _KERNEL_NODE:
            params = _KernelNodeParams()
            _check(drv.kernel_params(ctypes.c_void_p(node), ctypes.byref(params)), "cuGraphKernelNodeGetParams")
            raw = ctypes.c_char_p()
            if params.func and drv.func_name(ctypes.byref(raw), ctypes.c_void_p(params.func)) == 0 and raw.value:
                name = raw.value.decode()
            else:
                name = ""  # a kernel, but not one we can name (cuBLAS's library kernels): never a dependent
        names[node] = name
    return names[node]
