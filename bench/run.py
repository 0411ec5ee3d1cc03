"""Runs the micro-benchmarks and writes one results file: ``python bench/run.py [--quick] [-k EXPR] [--out PATH]``.

pytest (with pytest-benchmark) runs every ``bench/bench_*.py`` in a child process with the JSON report and a JUnit
XML report in a temporary directory; this script merges them with the machine, the versions and the git commit into
``bench/results/<device-slug>_<YYYY-MM-DD>.json`` (``<device-slug>-quick`` with ``--quick``, ``<device-slug>-subset``
with ``-k``, so that a partial run never replaces a full one), prints a table, and prints the results path as its
last line. Exit status 1 if any benchmark errored (or pytest itself failed).
See bench/README.md for the columns and the flop formulas.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
OP_ORDER = (
    "per_sample_gram",
    "per_sample_grad_sqnorms",
    "ef_diag",
    "kfac_factor_update",
    "damped_inverse",
    "kron_precondition",
    "kron_precondition_eigen",
    "kfac_step",
    "ief_update",
    "ief_step",
    "fop_update",
    "fop_precondition",
    "fop_step",
)
# "context": a measurement shown for scale that is no baseline (e.g. a plain SGD step beside the Adam step).
KIND_ORDER = ("pycurv", "torch.func", "baseline-a", "baseline", "baseline+compile", "context")
# Row kinds that are baseline (a) of their group: torch.func per-sample gradients, or a bench's own (a) baseline.
BASELINE_A_KINDS = ("torch.func", "baseline-a")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_info() -> dict:
    def git(*args):
        # --no-optional-locks: reading the status must not rewrite the index.
        res = subprocess.run(
            ["git", "--no-optional-locks", "-C", ROOT, *args], capture_output=True, text=True, timeout=30
        )
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip())
        return res.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [ln[3:] for ln in git("status", "--porcelain").splitlines() if ln.strip()]
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "note": f"git unavailable: {exc}"}
    changed = [p for p in changed if not p.startswith("bench/results/")]
    return {"commit": commit, "dirty": bool(changed), "changed_files": changed[:50]}


def junit_outcomes(path: str) -> tuple[list[dict], list[dict]]:
    """(errors, skipped) from pytest's JUnit XML report, each ``{"id", "message"}``."""
    errors, skipped = [], []
    if not os.path.exists(path):
        return errors, skipped
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            msg = (child.get("message") or child.text or "").strip()
            if child.tag in ("failure", "error"):
                errors.append({"id": name, "kind": child.tag, "message": msg[:2000]})
            elif child.tag == "skipped":
                skipped.append({"id": name, "message": msg[:500]})
    return errors, skipped


def build_rows(benchmarks: list[dict], peaks: dict | None) -> list[dict]:
    """One row per measurement with speedups against baselines (a) and (b), TFLOP/s and its share of the peak
    (``peaks``: TFLOP/s per dtype name, as the session finally reported them).

    Rows are grouped by (op, shape, dtype); ``shape`` is the benchmark's own label, or ``NxTxd_inxd_out`` for the
    per-sample ops. Baseline (b) is the fastest eager plain-PyTorch row of the group, (a) included."""
    rows = []
    for bm in benchmarks:
        info, st = bm.get("extra_info", {}), bm["stats"]
        if "op" not in info:
            continue
        dims = {k: info.get(k) for k in ("N", "T", "d_in", "d_out")}
        row = {
            "id": bm.get("fullname", bm["name"]),
            "op": info["op"],
            "shape": info.get("shape") or "x".join(str(dims[k]) for k in ("N", "T", "d_in", "d_out")),
            **dims,
            "dtype": info["dtype"],
            "impl": info["impl"],
            "name": info["name"],
            "median_s": st["median"],
            "mean_s": st["mean"],
            "min_s": st["min"],
            "iqr_s": st["iqr"],
            "stddev_s": st["stddev"],
            "rounds": st["rounds"],
            "calls_per_round": st["iterations"],
        }
        row.update({k: v for k, v in info.items() if k not in row})
        rows.append(row)

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    for grp in groups.values():
        a = next((r for r in grp if r["impl"] in BASELINE_A_KINDS), None)
        eager_b = [r for r in grp if r["impl"] in ("baseline", "baseline-a")]
        b = min(eager_b, key=lambda r: r["median_s"]) if eager_b else None
        for r in grp:
            if a is None:
                r["baseline_a"] = None
            else:
                r["baseline_a"] = "torch.func vmap(grad)" if a["impl"] == "torch.func" else a["name"]
            r["baseline_b"] = b["name"] if b else None
            r["is_baseline_b"] = r is b
            r["speedup_vs_a"] = a["median_s"] / r["median_s"] if a else None
            r["speedup_vs_b"] = b["median_s"] / r["median_s"] if b else None
            r["tflops"] = r["flops"] / r["median_s"] / 1e12
            if peaks and peaks.get(r["dtype"]):
                r["peak_tflops"] = peaks[r["dtype"]]
            peak = r.get("peak_tflops")
            r["frac_of_peak"] = r["tflops"] / peak if peak else None

    shape_order: dict[tuple, int] = {}
    for r in rows:
        shape_order.setdefault((r["shape"], r["dtype"]), len(shape_order))

    def key(r):
        op_rank = OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else len(OP_ORDER)
        kind_rank = KIND_ORDER.index(r["impl"]) if r["impl"] in KIND_ORDER else len(KIND_ORDER)
        # the per-sample ops share shapes and interleave by shape; every other op is a block of its own
        family = 0 if op_rank < 3 else op_rank
        return (family, shape_order[(r["shape"], r["dtype"])], op_rank, kind_rank, r["name"])

    return sorted(rows, key=key)


def merge_passes(passes: list[list[dict]]) -> list[dict]:
    """One row per measurement from several full passes (rows of :func:`build_rows`, one list per pass): a row's
    times and statistics are those of its median pass (by median time), its speedups the median over the passes of
    each pass's own speedup (both rows of such a ratio come from one pass, so a slow phase of a shared machine that
    lasts a pass moves both); ``pass_median_s`` keeps every pass's median time. A single pass is returned as is."""
    if len(passes) == 1:
        return passes[0]

    def middle(values):
        return sorted(values)[(len(values) - 1) // 2]

    by_id: dict[str, list[dict]] = {}
    for rows in passes:
        for r in rows:
            by_id.setdefault(r["id"], []).append(r)
    merged = []
    for seen in by_id.values():
        _, pick = middle([(r["median_s"], i) for i, r in enumerate(seen)])
        row = dict(seen[pick], pass_median_s=[r["median_s"] for r in seen])
        for k in ("speedup_vs_a", "speedup_vs_b"):
            vals = [r[k] for r in seen if r.get(k) is not None]
            row[k] = middle(vals) if vals else None
        merged.append(row)
    return merged


def _label(r: dict) -> str:
    if r["impl"] == "pycurv":
        return f"pycurv:{r['name']}"
    if r["impl"] == "torch.func":
        return "(a) torch.func"
    if r["impl"] == "baseline-a":
        return f"(a=b) {r['name']}" if r["is_baseline_b"] else f"(a) {r['name']}"
    if r["impl"] == "baseline":
        return f"(b) {r['name']}" if r["is_baseline_b"] else f"(b-alt) {r['name']}"
    if r["impl"] == "baseline+compile":
        return f"(b) {r['name']}"
    if r["impl"] == "context":
        return f"(ref) {r['name']}"
    return r["name"]


def _mem(nbytes) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _pct(frac) -> str:
    if frac is None:
        return "-"
    pct = 100 * frac
    return f"{pct:.0f}" if pct >= 10 else f"{pct:.1f}" if pct >= 1 else f"{pct:.2g}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_table(rows: list[dict]) -> str:
    head = (
        "op",
        "shape",
        "dtype",
        "backend",
        "median ms",
        "min ms",
        "x vs (a)",
        "x vs (b)",
        "TFLOP/s",
        "% peak",
        "peak extra mem",
    )
    body = []
    last_group = None
    for r in rows:
        group = (r["op"], r["shape"], r["dtype"])
        if last_group is not None and group != last_group:
            body.append(None)
        last_group = group
        body.append(
            (
                r["op"],
                r["shape"],
                r["dtype"],
                _label(r),
                f"{r['median_s'] * 1e3:.4g}",
                f"{r['min_s'] * 1e3:.4g}",
                _x(r["speedup_vs_a"]),
                _x(r["speedup_vs_b"]),
                f"{r['tflops']:.3g}",
                _pct(r["frac_of_peak"]),
                _mem(r.get("peak_extra_mem_bytes")),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in body if row)) for i, h in enumerate(head)]
    right = set(range(4, len(head)))

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    lines += ["" if row is None else fmt(row) for row in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes, shorter timing loops (smoke run)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--out", help="results file (default bench/results/<device-slug>_<date>.json)")
    parser.add_argument("--threads", type=int, help="torch CPU threads in the benchmark process (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (GPU)")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="full passes over the benchmarks; each row keeps its median pass and the median of its per-pass speedups",
    )
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels only
    env["PYCURV_BENCH_QUICK"] = "1" if args.quick else "0"
    if args.threads:
        env["PYCURV_BENCH_THREADS"] = str(args.threads)
    if args.no_compile:
        env["PYCURV_BENCH_COMPILE"] = "0"
    started = datetime.datetime.now()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        BENCH,
        "-o",
        "python_files=bench_*.py",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rsfE",
        "--benchmark-columns=median,iqr,rounds,iterations",
        "--benchmark-sort=name",
    ]
    if args.keyword:
        cmd += ["-k", args.keyword]
    t0 = time.perf_counter()
    passes, errors, skipped, rc, session = [], {}, {}, 0, {}
    for i in range(args.passes):
        with tempfile.TemporaryDirectory(prefix="pycurv-bench-") as tmp:
            bench_json, junit = os.path.join(tmp, "benchmark.json"), os.path.join(tmp, "junit.xml")
            pass_cmd = [*cmd, f"--benchmark-json={bench_json}", f"--junitxml={junit}"]
            print(f"+ [pass {i + 1}/{args.passes}]" if args.passes > 1 else "+", " ".join(pass_cmd), flush=True)
            rc = subprocess.run(pass_cmd, cwd=ROOT, env=env).returncode or rc
            pass_errors, pass_skipped = junit_outcomes(junit)
            errors.update((e["id"], e) for e in pass_errors)
            skipped.update((e["id"], e) for e in pass_skipped)
            if not os.path.exists(bench_json):
                print(f"pytest exited with status {rc} and wrote no benchmark results", file=sys.stderr)
                return rc or 1
            with open(bench_json) as f:
                raw = json.load(f)
        session = session or raw.get("pycurv_session", {})
        passes.append(build_rows(raw.get("benchmarks", []), session.get("peak_tflops")))
    runtime = time.perf_counter() - t0
    rows = merge_passes(passes)
    errors, skipped = list(errors.values()), list(skipped.values())
    if session.get("device_type") == "cuda":
        device_slug = slug(session.get("device_name", "gpu"))
    else:
        device_slug = f"cpu-{slug(session.get('cpu_model', 'unknown'))}-{session.get('torch_threads', 0)}t"
    if args.quick:
        device_slug += "-quick"
    if args.keyword:
        device_slug += "-subset"
    out = args.out or os.path.join(BENCH, "results", f"{device_slug}_{started:%Y-%m-%d}.json")

    result = {
        "schema": 1,
        "date": f"{started:%Y-%m-%d}",
        "started": started.isoformat(timespec="seconds"),
        "runtime_s": round(runtime, 1),
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": {
            "type": session.get("device_type"),
            "name": session.get("device_name"),
            "cpu_model": session.get("cpu_model"),
            "cpu_count": session.get("cpu_count"),
            "torch_threads": session.get("torch_threads"),
        },
        "versions": session.get("versions"),
        "git": git_info(),
        "peak_tflops": session.get("peak_tflops"),
        "peak_source": session.get("peak_source"),
        "memory_method": session.get("memory_method"),
        "timing": "pytest-benchmark pedantic: median over rounds of the per-call time (calls_per_round back-to-back "
        "calls per round, CUDA synchronised inside the timed callable at the end of each round); first call "
        "(compile / autotune) untimed; inputs reused, caches warm"
        + (
            f"; {args.passes} full passes: each row's statistics are those of its median pass, its speedups the "
            "median of its per-pass speedups, pass_median_s lists every pass's median"
            if args.passes > 1
            else ""
        ),
        "flops": "2 per multiply-add, elementwise work ignored, symmetric products counted on and above the "
        "diagonal only, the same count for every row of one op/shape "
        "(per-sample ops: the algorithm pycurv.ops.choose_method picks; K-FAC ops: see bench/README.md); "
        "TFLOP/s = flops / median; formula per row",
        "baselines": {
            "a": "per-sample ops: torch.func vmap(grad) per-sample weight gradients of a linear layer, flattened to "
            "J, then J J^T / row norms / column sums of squares; damped_inverse: a Python loop over the layers of "
            "torch.linalg.cholesky + torch.cholesky_inverse; ief_update: torch.func vmap(grad) per-sample gradients of "
            "every layer concatenated to J, J J^T, torch.linalg.solve in float64, J^T alpha",
            "b": "the faster eager plain-PyTorch formulation per op/shape/dtype (named in baseline_b; (a) competes "
            "too); per-sample ops: matmuls in the input dtype, the rest in float32; kfac_step, ief_step: an Adam "
            "step; ief_update: ghost Grams per layer (or bmm per-sample gradients of one layer where the cost model "
            "materialises), closed-form s, float64 Cholesky, (g * alpha)^T a per layer; fop_update / fop_precondition: "
            "the faster of batched matmuls and a loop over the layers of C = G_prev^T G_cur, M += c (C + C^T) M / "
            "G (M M^T); fop_step: the bare base optimizer's step (SGD with momentum 0.9, or Adam)",
        },
        "float32_matmul_precision": session.get("float32_matmul_precision"),
        "quick": args.quick,
        "passes": args.passes,
        "pytest_exit_status": rc,
        "rows": rows,
        "skipped": skipped,
        "errors": errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    print()
    dev = result["device"]
    print(
        f"device: {dev['name']} ({dev['torch_threads']} torch threads); peak TFLOP/s {result['peak_tflops']} "
        f"({result['peak_source']})"
    )
    print(f"memory: {result['memory_method']}")
    print(format_table(rows))
    for s in skipped:
        print(f"skipped: {s['id']}: {s['message']}")
    suspicious = [
        r
        for r in rows
        if r.get("rel_err_vs_reference") is not None
        and r["rel_err_vs_reference"] > (1e-4 if r["dtype"] == "float32" else 5e-2)
    ]
    for r in suspicious:
        print(f"check: {r['id']} differs from pycurv.reference by {r['rel_err_vs_reference']:.3g} (relative)")
    for e in errors:
        print(f"ERROR: {e['id']}: {e['message'].splitlines()[0] if e['message'] else e['kind']}")
    print(f"{len(rows)} measurements, {len(skipped)} skipped, {len(errors)} errors in {runtime:.0f} s")
    print(out)
    return 1 if (errors or rc != 0) else 0


if __name__ == "__main__":
    sys.exit(main())
