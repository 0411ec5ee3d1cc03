"""Shared machinery of the micro-benchmarks: device, timing loop, peak compute, peak extra memory.

Every benchmark times one callable with ``benchmark.pedantic`` (CUDA is synchronised inside the timed callable),
measures the peak extra memory of one call, and stores what ``bench/run.py`` needs to build the results table in
``benchmark.extra_info``. Session-wide facts (device, threads, peak throughput, memory method) are added to the
pytest-benchmark JSON under the key ``"pycurv_session"``.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import time
from typing import Callable

# The benchmarks measure compiled kernels only: the Triton interpreter must never be picked up, and it is chosen
# when triton is first imported, so the variable goes before anything imports triton.
os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYCURV_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PYCURV_BENCH_THREADS"]))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
QUICK = os.environ.get("PYCURV_BENCH_QUICK", "0") == "1"
# Seconds of timed rounds per measurement (after calibration); the CPU budget keeps `make bench` near 5 minutes.
BUDGET_S = {"cuda": 0.25, "cpu": 0.4}[DEVICE.type] * (0.4 if QUICK else 1.0)
# Shortest timed round: tiny calls are repeated inside a round so timer and launch jitter stay small against it.
MIN_ROUND_S = 2e-3 if DEVICE.type == "cuda" else 1e-3

# Dense peak throughput in TFLOP/s from the vendors' data sheets (SXM parts unless named). H200 has H100's compute.
GPU_PEAKS = {
    "H100 PCIe": {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.2},
    "H100 NVL": {"bfloat16": 835.0, "tf32": 418.0, "float32": 60.0},
    "H100": {"bfloat16": 989.0, "tf32": 494.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "tf32": 494.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5},
}

MEM_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before "
    "one call (inputs excluded, output included); caching-allocator bytes",
    "cpu": "process resident-set high-water mark: /proc/self/clear_refs reset to the current RSS (after gc and "
    "malloc_trim), one call, then VmHWM minus that RSS (inputs excluded, output included); page granularity",
}


def grid_key() -> str:
    """Which shape grid a benchmark module runs: "quick", "gpu" or "cpu"."""
    return "quick" if QUICK else ("gpu" if GPU else "cpu")


def timed_backends(op: str, method: str | None = None) -> list[str]:
    """The backends of ``op`` to time here: interpreted Triton is a correctness tool, not a kernel, and is never
    timed."""
    import pycurv.ops

    return [b for b in pycurv.ops.available_backends(DEVICE, op, method) if not (not GPU and b == "triton")]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mm_rate(dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best TFLOP/s of ``torch.mm`` on two ``size x size`` matrices of ``dtype`` on this process's threads."""
    x = torch.randn(size, size, device=DEVICE).to(dtype)
    y = torch.randn(size, size, device=DEVICE).to(dtype)
    torch.mm(x, y)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, y)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e12


_PEAKS: dict | None = None


def _measure_cpu_peaks() -> dict:
    return {
        "float32": _mm_rate(torch.float32, 1536, 10),
        "bfloat16": _mm_rate(torch.bfloat16, 1536, 10),
    }


def device_peaks(remeasure: bool = False) -> dict:
    """``{"tflops": {dtype name: TFLOP/s or None}, "source": str}`` for this device, computed once.

    On the CPU, ``remeasure=True`` measures again and keeps the higher rate per dtype: a core taken by another
    process during one measurement must not lower the peak that every row is divided by.
    """
    global _PEAKS
    if _PEAKS is not None and not (remeasure and DEVICE.type == "cpu"):
        return _PEAKS
    if DEVICE.type == "cuda":
        name = device_name()
        table = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        if table is None:
            _PEAKS = {"tflops": {"float32": None, "bfloat16": None}, "source": f"no data-sheet peak known for {name}"}
        else:
            _PEAKS = {
                "tflops": dict(table),
                "source": "vendor data sheet, dense (float32 rows use the non-tensor-core fp32 peak: "
                "torch's float32 matmul precision is left at 'highest')",
            }
    else:
        rates = _measure_cpu_peaks()
        if _PEAKS is not None:
            rates = {k: max(v, _PEAKS["tflops"][k]) for k, v in rates.items()}
        _PEAKS = {
            "tflops": rates,
            "source": f"measured: best of 10 torch.mm 1536x1536x1536 per dtype on {torch.get_num_threads()} "
            "threads, at the start and at the end of the run (the higher rate is kept)",
        }
    return _PEAKS


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


_CPU_HWM_OK: bool | None = None


def _malloc_trim() -> None:
    # Freed heap pages stay resident under glibc; returning them first keeps an earlier, larger call from hiding
    # the next call's growth.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_memory(fn: Callable[[], object]) -> tuple[int | None, object]:
    """(peak bytes one call of ``fn`` adds on top of what is already held, or None if unmeasurable; its result)."""
    global _CPU_HWM_OK
    gc.collect()
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        out = fn()
        sync()
        return int(torch.cuda.max_memory_allocated(DEVICE) - base), out
    if _CPU_HWM_OK is None:
        _CPU_HWM_OK = _can_reset_hwm()
    if not _CPU_HWM_OK:
        return None, fn()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_kib("VmRSS")
    out = fn()
    return max(_proc_status_kib("VmHWM") - base, 0) * 1024, out


def memory_method() -> str:
    if DEVICE.type == "cpu" and _CPU_HWM_OK is False:
        return "unavailable: /proc/self/clear_refs cannot be written here"
    return MEM_METHOD[DEVICE.type]


class _SyncEveryRound:
    """The timed callable: calls ``fn``; on CUDA it synchronises after every ``calls_per_round``-th call.

    pytest-benchmark times ``iterations`` back-to-back calls per round and divides by that number, so synchronising
    on the round's last call puts exactly the round's GPU work inside its timing while small kernels still run
    back to back (one synchronisation per call would add its own latency to every call).
    """

    def __init__(self, fn: Callable[[], object], calls_per_round: int):
        self.fn, self.every, self.calls = fn, calls_per_round, 0

    def __call__(self):
        out = self.fn()
        self.calls += 1
        if DEVICE.type == "cuda" and self.calls % self.every == 0:
            torch.cuda.synchronize()
        return out


def time_call(benchmark, fn: Callable[[], object]) -> dict:
    """Times ``fn`` with ``benchmark.pedantic``; returns the loop parameters it chose.

    The first call (compilation, autotuning, lazy loading) is not timed; a short calibration sizes the rounds so
    each lasts at least ``MIN_ROUND_S`` and all of them about ``BUDGET_S``.
    """
    t0 = time.perf_counter()
    fn()
    sync()
    first_call_s = time.perf_counter() - t0
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= 0.02 or calls >= 50 or elapsed >= BUDGET_S / 4:
            break
    per_call = max(elapsed / calls, 1e-7)
    iterations = max(1, math.ceil(MIN_ROUND_S / per_call))
    slow = per_call * iterations > 0.05
    rounds = int(min(200, max(3 if slow else 5, BUDGET_S / (per_call * iterations))))
    # A slow call is already warm after the first call and the calibration; another warm-up round only costs time.
    warmup_rounds = 0 if slow else 1
    sync()
    benchmark.pedantic(
        _SyncEveryRound(fn, iterations), rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds
    )
    return {"rounds": rounds, "calls_per_round": iterations, "first_call_s": first_call_s}


def _versions() -> dict:
    from importlib import metadata

    import pycurv

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        from pycurv._build_config import BUILD_CONFIG
    except ImportError:
        BUILD_CONFIG = None
    ops = (
        "per_sample_gram",
        "per_sample_grad_sqnorms",
        "ef_diag",
        "kfac_factor_update",
        "damped_inverse",
        "sym_eig",
        "kron_precondition",
        "kron_precondition_eigen",
        "weighted_grad_sum",
        "per_sample_grad_dot",
        "logit_grad_sqnorms",
        "ief_coefficients",
        "fop_update",
        "fop_precondition",
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if DEVICE.type == "cuda" else None,
        "triton": dist("triton"),
        "pytest_benchmark": dist("pytest-benchmark"),
        "pycurv": pycurv.__version__,
        "pycurv_build": BUILD_CONFIG,
        "pycurv_extension_error": pycurv._extension.LOAD_ERROR,
        "pycurv_backends": {op: pycurv.ops.available_backends(DEVICE, op) for op in ops},
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    peaks = device_peaks(remeasure=True) if benchmarks else None
    output_json["pycurv_session"] = {
        "versions": _versions(),
        "device_type": DEVICE.type,
        "device_name": device_name(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "peak_tflops": peaks["tflops"] if peaks else None,
        "peak_source": peaks["source"] if peaks else None,
        "memory_method": memory_method(),
        "quick": QUICK,
        "budget_s_per_measurement": BUDGET_S,
    }


@pytest.fixture
def peaks() -> dict:
    return device_peaks()
