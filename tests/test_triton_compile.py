"""Every Triton kernel of pycurv.kernels compiles for Hopper (sm_90a), in every configuration it can run with,
without register spills and within the shared memory of one SM. No GPU needed.

The kernels and their configurations come from each kernel module's ``KERNELS`` registry, so a kernel added there
is compiled here too. Compilation runs in worker processes without ``TRITON_INTERPRET`` (which conftest.py sets on
machines without a GPU and which turns ``@triton.jit`` functions into interpreted ones). Each configuration is
compiled as the launcher would see contiguous inputs: 16-byte aligned pointers and unit feature strides. Each kernel
is compiled once more with every integer argument a constant 1, as torch.compile may pass it (spills not checked).
Registers and spills come from Triton's bundled ``ptxas -v``, shared memory from the compiled metadata; the
per-configuration table is printed (see it with ``pytest -rA``) and attached as ``record_property`` entries.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

KERNEL_MODULES = ("pycurv.kernels.per_sample", "pycurv.kernels.kfac", "pycurv.kernels.ief", "pycurv.kernels.fop")
# Hopper: 227 KiB of shared memory per block at most
MAX_SHARED = 232448
# Integer arguments that are 1 for contiguous inputs (Triton specialises a 1 into a constant at launch).
UNIT_STRIDES = ("sa_d", "sg_d")
WORKERS = 2


def _jobs() -> list[tuple[str, str, str, int, bool]]:
    """(module, kernel, dtype, config index, ones) for every registered configuration (ones=False), and per kernel
    its first configuration again with every integer argument a constant 1 (ones=True): torch.compile passes an
    integer argument equal to 1 as a constexpr, whatever ``do_not_specialize`` says."""
    jobs = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, spec in mod.KERNELS.items():
            dts = [dt for dt in mod.DTYPES if spec.configs(dt)]
            for dt in dts:
                for idx in range(len(spec.configs(dt))):
                    jobs.append((mod_name, name, dt, idx, False))
            if dts:
                jobs.append((mod_name, name, dts[0], 0, True))
    return jobs


def _job_id(job) -> str:
    return f"{job[1]}-{job[2]}-cfg{job[3]}" + ("-ints1" if job[4] else "")


def _compile_one(mod_name: str, name: str, dt: str, idx: int, ones: bool) -> dict:
    """Compiles one configuration for sm_90a (with ``ones``, every integer argument a constant 1); runs in a worker
    without the interpreter."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    mod = importlib.import_module(mod_name)
    spec = mod.KERNELS[name]
    fn = spec.fn
    cfg = spec.configs(dt)[idx]
    runtime = spec.signature(dt)
    consts = dict(spec.constants(dt))
    consts.update(cfg.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for pos, arg in enumerate(fn.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
            constexprs[arg] = consts[arg]
        elif arg in UNIT_STRIDES or (ones and runtime.get(arg) == "i32"):
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in runtime:
            signature[arg] = runtime[arg]
            if runtime[arg].startswith("*"):
                attrs[(pos,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{name}: argument {arg!r} has no type in the registry signature")
    extra = set(runtime) - set(fn.arg_names)
    if extra:
        raise KeyError(f"{name}: registry signature names unknown arguments {sorted(extra)}")
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", "--gpu-name", arch, path, "-o", os.devnull], capture_output=True, text=True, check=True
        )
    info = res.stdout + res.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    meta = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return {
        "id": _job_id((mod_name, name, dt, idx, ones)),
        "kernel": name,
        "dtype": dt,
        "config": f"{meta}, warps={cfg.num_warps}, stages={cfg.num_stages}",
        "arch": arch,
        "regs": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "smem": int(compiled.metadata.shared),
        "wgmma": "wgmma" in ptx,
    }


def _worker(shard: int, shards: int) -> None:
    for k, job in enumerate(_jobs()):
        if k % shards != shard:
            continue
        try:
            out = _compile_one(*job)
        except Exception as exc:  # noqa: BLE001 - any failure is reported as that config's result
            out = {"id": _job_id(job), "error": f"{type(exc).__name__}: {exc}"[:4000]}
        print(json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", str(w), str(WORKERS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    results: dict[str, dict] = {}
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            pytest.fail(f"compile worker failed (exit {p.returncode}):\n{err[-4000:]}")
        for line in out.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                results[rec["id"]] = rec
    return results


def _table(rows: list[dict]) -> str:
    head = f"{'kernel':<22} {'dtype':<5} {'regs':>4} {'spill st/ld':>11} {'smem':>7} {'wgmma':>5}  config"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['id']}: ERROR {r['error'].splitlines()[0]}")
            continue
        lines.append(
            f"{r['kernel']:<22} {r['dtype']:<5} {r['regs']:>4} {r['spill_stores']:>5}/{r['spill_loads']:<5} "
            f"{r['smem']:>7} {r['wgmma']!s:>5}  {r['config']}"
        )
    return "\n".join(lines)


_JOBS = _jobs() if importlib.util.find_spec("triton") is not None else []


@pytest.mark.parametrize("job", _JOBS, ids=[_job_id(j) for j in _JOBS])
def test_config_compiles_for_hopper(job, compiled, record_property):
    rec = compiled.get(_job_id(job))
    assert rec is not None, f"{_job_id(job)}: no result from the compile workers"
    assert "error" not in rec, f"{_job_id(job)} failed to compile:\n{rec['error']}"
    for key in ("regs", "spill_stores", "spill_loads", "smem", "config"):
        record_property(key, rec[key])
    print(_table([rec]))
    if job[4]:
        return  # compiling is the point; a specialisation for 1 x 1 problems may spill a register or two
    assert rec["arch"].startswith("sm_90"), rec
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, f"register spills: {rec}"
    assert rec["smem"] <= MAX_SHARED, f"shared memory over the per-block limit: {rec}"
    assert 0 < rec["regs"] <= 255, rec


def test_report(compiled, record_property):
    """The whole table in one place (printed; ``pytest -rA`` shows it)."""
    rows = [compiled[k] for k in sorted(compiled)]
    table = _table(rows)
    record_property("report", table)
    print(table)
    assert len(rows) == len(_JOBS)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]))
