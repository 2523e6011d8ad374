"""The blocks' GEMMs on cuBLASLt with the algorithm picked by timing (speed switch `lt_gemms`; nvmath-python).

Why: F.linear and torch._scaled_mm run the first algorithm of cuBLASLt's heuristic. At the DiT's shapes that is not
always the fastest one: on the H100 (2026-12-07, bench/gemm_algos.py, M = 4352) the bf16 q/k/v GEMM ran 503.9 us with
cuBLAS's pick and 484.6 us with the heuristic's fifth candidate (tile 176 x 128: 4352 x 11520 makes 17.0 waves on
132 SMs). torch's rowwise fp8 GEMM ran one configuration, 128 x 128 without clusters, for all four shapes (the
2026-12-07 profile: `nvjet_sm90_qqtst_128x128_128x6_1x1_..._ovscale`).

How: the same cuBLASLt call torch makes (D^T = W X^T, column-major; e4m3 with outer-vector scales: the weight's per
channel, the activations' per row; float32 accumulation without fast accumulation, as torch._scaled_mm's default), but
the algorithm comes from timing up to CANDIDATES of the heuristic's list on the first call of a shape (rows, in, out,
dtype), eagerly, outside any CUDA graph capture. The choice is kept for the process. A call during a capture uses the
choice made for its shape, or the heuristic's first (no timing is possible there). Calls go on the current stream, so
they run inside the step graphs. Needs nvmath-python (its cuBLASLt bindings) and a CUDA GPU of compute capability 9.0
or more; elsewhere `available` says no and the blocks call torch.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger("zimage.lt_gemm")

CANDIDATES = 16  # heuristic candidates timed per shape
WORKSPACE_BYTES = 32 << 20  # torch's own cuBLASLt workspace size on Hopper
TUNE_RUNS = 5
_R_32F, _R_16BF, _R_8F_E4M3 = 0, 14, 28  # cudaDataType_t
_COMPUTE_32F = 68  # cublasComputeType_t
_OP_N, _OP_T = 0, 1
_OUTER_VEC_32F = 3  # cublasLtMatmulMatrixScale_t


def available(device) -> bool:
    """Whether cuBLASLt GEMMs can run on `device` (asked on every eager block run, so the answer is kept)."""
    return _available(torch.device(device))


@functools.cache
def _available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        from nvmath.bindings import cublasLt  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or its CUDA libraries cannot load: torch's GEMMs run
        return False
    return True


def _set(setter, obj, dtype_of, attr, value) -> None:
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.nbytes)


class _Shape:
    """One (rows, in, out, fp8) problem: its descriptor, layouts, and the algorithm chosen for it."""

    def __init__(self, lt, handle, rows: int, k: int, n: int, fp8: bool):
        self.lt, self.handle = lt, handle
        attr = lt.MatmulDescAttribute
        self.desc = lt.matmul_desc_create(_COMPUTE_32F, _R_32F)
        self.set_desc = lambda a, v: _set(lt.matmul_desc_set_attribute, self.desc, lt.get_matmul_desc_attribute_dtype,
                                          a, v)
        self.set_desc(attr.TRANSA, _OP_T)
        self.set_desc(attr.TRANSB, _OP_N)
        operand = _R_8F_E4M3 if fp8 else _R_16BF
        if fp8:
            self.set_desc(attr.A_SCALE_MODE, _OUTER_VEC_32F)
            self.set_desc(attr.B_SCALE_MODE, _OUTER_VEC_32F)
        self.weight = lt.matrix_layout_create(operand, k, n, k)  # W (out, in) row-major = (in, out) column-major
        self.rows = lt.matrix_layout_create(operand, k, rows, k)
        self.out = lt.matrix_layout_create(_R_16BF, n, rows, n)
        self.fp8, self.dims = fp8, (rows, k, n)
        self.candidates = self._heuristic()
        self.algo = self.candidates[0]["algo"] if len(self.candidates) else None
        self.tuned = False
        self.times_us: list[float] = []

    def _heuristic(self):
        lt = self.lt
        pref = lt.matmul_preference_create()
        try:
            _set(lt.matmul_preference_set_attribute, pref, lt.get_matmul_preference_attribute_dtype,
                 lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES, WORKSPACE_BYTES)
            results = lt.MatmulHeuristicResult(CANDIDATES)
            count = np.zeros(1, dtype=np.int32)
            lt.matmul_algo_get_heuristic(self.handle, self.desc, self.weight, self.rows, self.out, self.out, pref,
                                         CANDIDATES, results.ptr, count.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        return results[: int(count[0])]

    def launch(self, algo, x, weight, out, x_scale, weight_scale, workspace, alpha, beta) -> None:
        if self.fp8:  # the scales' addresses change per call (the activations' scales are new each time)
            attr = self.lt.MatmulDescAttribute
            self.set_desc(attr.A_SCALE_POINTER, weight_scale.data_ptr())
            self.set_desc(attr.B_SCALE_POINTER, x_scale.data_ptr())
        self.lt.matmul(self.handle, self.desc, alpha.ctypes.data, weight.data_ptr(), self.weight, x.data_ptr(),
                       self.rows, beta.ctypes.data, out.data_ptr(), self.out, out.data_ptr(), self.out,
                       algo.ctypes.data, workspace.data_ptr(), WORKSPACE_BYTES,
                       torch.cuda.current_stream(x.device).cuda_stream)


class LtGemms:
    """cuBLASLt GEMMs for one process: a handle, a workspace per device, the shapes seen and their algorithms."""

    def __init__(self):
        from nvmath.bindings import cublasLt

        self.lt = cublasLt
        self.handle = cublasLt.create()
        self.shapes: dict = {}
        self.workspaces: dict = {}
        self.alpha = np.ones(1, dtype=np.float32)
        self.beta = np.zeros(1, dtype=np.float32)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor | None = None,
               weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """x (rows, in) times weight (out, in)^T -> (rows, out) bf16; e4m3 operands take x_scale (rows, 1) and
        weight_scale (1, out) float32, as torch._scaled_mm's rowwise scaling. None where cuBLASLt offers no
        algorithm for the shape (the caller runs torch's GEMM)."""
        rows, k = x.shape
        n = weight.shape[0]
        fp8 = x.dtype == torch.float8_e4m3fn
        key = (rows, k, n, fp8, x.device)
        shape = self.shapes.get(key)
        if shape is None:
            try:
                shape = _Shape(self.lt, self.handle, rows, k, n, fp8)
            except Exception as exc:  # noqa: BLE001 - cuBLASLt refused the problem: torch's GEMM runs it
                log.warning("cuBLASLt GEMM %s: %s; torch's GEMM runs it", (rows, k, n, fp8), exc)
                shape = None
            self.shapes[key] = shape
        if shape is None or shape.algo is None:
            return None
        workspace = self.workspaces.get(x.device)
        if workspace is None:
            workspace = self.workspaces[x.device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=x.device)
        out = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
        x, weight = x.contiguous(), weight.contiguous()
        if fp8:  # the scales are read as float32 vectors
            x_scale, weight_scale = x_scale.float().contiguous(), weight_scale.float().contiguous()
        args = (x, weight, out, x_scale, weight_scale, workspace, self.alpha, self.beta)
        if not shape.tuned and not torch.cuda.is_current_stream_capturing():
            self._tune(shape, args)
        try:
            shape.launch(shape.algo, *args)
        except Exception as exc:  # noqa: BLE001 - cuBLASLt refused the call (before any launch): torch runs it
            log.warning("cuBLASLt GEMM %s failed (%s); torch's GEMM runs it", shape.dims, exc)
            self.shapes[key] = None
            return None
        return out

    def _tune(self, shape: _Shape, args) -> None:
        times = []
        for i in range(len(shape.candidates)):
            algo = shape.candidates[i]["algo"]
            try:
                shape.launch(algo, *args)  # warm-up (and a check that it runs)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(TUNE_RUNS):
                    shape.launch(algo, *args)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / TUNE_RUNS)
            except Exception as exc:  # noqa: BLE001 - a candidate that fails is skipped
                log.debug("cuBLASLt candidate failed: %s", exc)
                times.append(float("inf"))
        shape.tuned, shape.times_us = True, times
        if times and min(times) < float("inf"):
            best = int(np.argmin(times))
            shape.algo = shape.candidates[best]["algo"]
            log.info("cuBLASLt GEMM %s%s: candidate %d of %d, %.1f us (the heuristic's first: %.1f us)",
                     shape.dims, " e4m3" if shape.fp8 else "", best, len(times), times[best], times[0])


_GEMMS: LtGemms | None = None


def gemms() -> LtGemms:
    """The process's LtGemms (made on first use)."""
    global _GEMMS
    if _GEMMS is None:
        _GEMMS = LtGemms()
    return _GEMMS
