"""kNN scoring speed and memory: dn2 exact vs scikit-learn brute force vs PyOD KNN vs FAISS flat, + approximate modes.

Synthetic float32 embeddings (a Gaussian mixture, generated in chunks so 10^6 x 2048 = 8 GB never
needs a float64 copy), 10^4 queries, k = 2, DN2 score = mean distance to the k nearest. Every
(method, d, N) runs in its own subprocess, which generates the same data from the same seeds and
reports fit and search time and the peak resident memory above the data (RSS polled every 5 ms).
Scores are compared with dn2 exact (max relative difference); approximate indexes (dn2.search
make_index "ivf", "ivf_faiss", "hnsw", "ivfpq") report recall@k of the exact neighbours and their search
throughput relative to dn2 exact. A method is skipped at a size where its time, extrapolated from
the previous size (PyOD's fit scores its own training set, so quadratically), exceeds --max-seconds.

Usage (full run: hours at N = 10^6; about 24 GB of RAM needed there):
    python benchmarks/search.py --plot search.png
    python benchmarks/search.py --sizes 1000,10000 --dims 1280 --queries 2000    # quick check
    python benchmarks/search.py --omp-check                                      # faiss after torch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXACT_METHODS = ("dn2", "dn2_fp32", "sklearn", "pyod", "faiss_flat")
APPROX_METHODS = ("ivf", "ivf_faiss", "hnsw", "ivfpq")
LABELS = {
    "dn2": "dn2 exact, default (`knn`, precision auto)",
    "dn2_fp32": "dn2 exact, fp32 screening (`knn(precision='fp32')`)",
    "sklearn": "scikit-learn NearestNeighbors(brute)",
    "pyod": "PyOD KNN(method='mean')",
    "faiss_flat": "FAISS IndexFlatL2",
    "ivf": "dn2 make_index('ivf') (batched IVF)",
    "ivf_faiss": "dn2 make_index('ivf_faiss') (FAISS IndexIVFFlat)",
    "hnsw": "dn2 make_index('hnsw')",
    "ivfpq": "dn2 make_index('ivfpq')",
}
FIT_EXPONENT = {"pyod": 2.0}


def parse_approx(method: str) -> tuple[str, dict]:
    """'ivf:nprobe=32+nlist=1000' -> ('ivf', {'nprobe': 32, 'nlist': 1000}): an index kind with parameters."""
    kind, _, rest = method.partition(":")
    params = {}
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        params[key] = float(value) if "." in value else int(value)
    return kind, params


def label(method: str) -> str:
    """Table label of a method, including an approximate index's parameters."""
    if method in LABELS:
        return LABELS[method]
    kind, params = parse_approx(method)
    args = "".join(f", {k}={v}" for k, v in params.items())
    return f"dn2 make_index('{kind}'{args})"  # how fit time grows with N (PyOD scores the training set against itself)


# ------------------------------------------------------------------------------------------ data


def mixture(n: int, d: int, seed: int, n_clusters: int = 32, chunk: int = 65536) -> np.ndarray:
    """(n, d) float32 Gaussian mixture with shared centres; deterministic, generated chunk by chunk."""
    centres = np.random.default_rng(12345 + d).normal(0.0, 1.0, (n_clusters, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for i, s in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, i])
        e = min(n, s + chunk)
        out[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] *= 0.5
        out[s:e] += centres[rng.integers(0, n_clusters, e - s)]
    return out


# ------------------------------------------------------------------------------------------ memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Polls the resident set size in a thread; ``peak - start`` is the memory a method added."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ------------------------------------------------------------------------------------------ one run


def run_method(method: str, n: int, d: int, n_queries: int, k: int, out_dir: str) -> dict:
    """Fit + search one method on one (N, d); saves scores/idx to out_dir; returns times and memory."""
    train = mixture(n, d, seed=1)
    queries = mixture(n_queries, d, seed=2)
    # Import outside the timed, memory-polled block: only fitting and searching are measured.
    import importlib

    for module in {"dn2": ["dn2.search"], "sklearn": ["sklearn.neighbors"], "pyod": ["pyod.models.knn"],
                   "faiss_flat": ["faiss"]}.get(method, ["dn2.search"]):
        importlib.import_module(module)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if method in ("dn2", "dn2_fp32"):
            from dn2.search import knn

            fitted = time.perf_counter()
            precision = "fp32" if method == "dn2_fp32" else "auto"
            counters: dict = {}
            dist, idx = knn(train, queries, k, precision=precision, stats=counters)
        elif method == "sklearn":
            from sklearn.neighbors import NearestNeighbors

            nn_ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train)
            fitted = time.perf_counter()
            dist, idx = nn_.kneighbors(queries)
        elif method == "pyod":
            from pyod.models.knn import KNN

            det = KNN(method="mean", n_neighbors=k).fit(train)
            fitted = time.perf_counter()
            scores = det.decision_function(queries)
            dist, idx = scores[:, None], None
        elif method == "faiss_flat":
            import faiss

            index = faiss.IndexFlatL2(d)
            index.add(train)
            fitted = time.perf_counter()
            sq, idx = index.search(queries, k)
            dist = np.sqrt(np.maximum(sq, 0))
        else:
            from dn2.search import make_index

            kind, params = parse_approx(method)
            index = make_index(kind, **params).fit(train)
            fitted = time.perf_counter()
            dist, idx = index.search(queries, k)
        done = time.perf_counter()
    scores = np.asarray(dist, dtype=np.float64).mean(axis=1)
    np.save(Path(out_dir) / f"{method}-{d}-{n}-scores.npy", scores)
    if idx is not None:
        np.save(Path(out_dir) / f"{method}-{d}-{n}-idx.npy", np.asarray(idx))
    out = {"fit": fitted - t0, "search": done - fitted, "peak": mem.peak - mem.start}
    if method in ("dn2", "dn2_fp32"):  # screening precision used, queries redone in fp32 (not certified)
        out["precision"], out["uncertified"] = counters["precision"], counters["uncertified"]
    return out


def in_subprocess(job: dict, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_job", json.dumps(job)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ OpenMP check


def omp_check() -> str:
    """Small FAISS searches timed alone and after torch ran, with the default and PASSIVE OpenMP wait policy."""
    code = r"""
import time, numpy as np, torch, faiss, json, sys
x = np.random.default_rng(0).normal(size=(5000, 256)).astype(np.float32); q = x[:50]
index = faiss.IndexFlatL2(256); index.add(x)
def small(): 
    t = time.perf_counter()
    for _ in range(50): index.search(q, 2)
    return (time.perf_counter() - t) / 50 * 1e3
alone = small()
a = torch.randn(512, 512)
for _ in range(20): a @ a   # torch's OpenMP pool spins after work
after = min(small() for _ in range(3))
print(json.dumps([alone, after]))
"""
    lines = ["| OMP_WAIT_POLICY | faiss small search alone (ms) | after torch ran (ms) |", "| --- | ---: | ---: |"]
    for policy in ("default", "PASSIVE"):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        alone, after = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else (float("nan"),) * 2
        lines.append(f"| {policy} | {alone:.2f} | {after:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="training set sizes N, comma-separated")
    p.add_argument("--dims", default="1280,2048", help="embedding dimensions, comma-separated")
    p.add_argument("--queries", type=int, default=10000, help="number of queries (default 10^4)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--methods", default=",".join(EXACT_METHODS), help=f"exact methods: {','.join(EXACT_METHODS)}")
    p.add_argument("--approx", default=",".join(APPROX_METHODS),
                   help="approximate indexes ('' for none), with parameters as in ivf:nprobe=32+nlist=1000")
    p.add_argument("--max-seconds", type=float, default=600.0, help="skip a method where it would take longer")
    p.add_argument("--plot", help="write a log-log plot of search time vs N to this file")
    p.add_argument("--omp-check", action="store_true", help="only run the faiss-after-torch OpenMP check")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._job:
        print(json.dumps(run_method(**json.loads(args._job))))
        return 0

    sys.path.insert(0, str(HERE))
    from machine import header

    print(header("dn2 kNN search: exact and approximate"))
    if args.omp_check:
        print("\n" + omp_check())
        return 0
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dims = [int(s) for s in args.dims.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    approx = [m for m in args.approx.split(",") if m]
    print(f"- {args.queries} queries, k = {args.k}, Gaussian-mixture float32 data, cap {args.max_seconds:.0f} s "
          f"per method and size\n")

    tmp = tempfile.mkdtemp(prefix="dn2-search-")
    results: dict[tuple[str, int, int], dict] = {}
    try:
        for d in dims:
            last: dict[str, tuple[int, dict]] = {}
            for n in sizes:
                for method in ["dn2", *[m for m in methods if m != "dn2"], *approx]:
                    if method in last:
                        n0, r0 = last[method]
                        ratio = n / n0
                        predicted = r0["fit"] * ratio ** FIT_EXPONENT.get(method, 1.0) + r0["search"] * ratio
                        if predicted > args.max_seconds:
                            results[method, d, n] = {"skipped": predicted}
                            continue
                    job = {"method": method, "n": n, "d": d, "n_queries": args.queries, "k": args.k, "out_dir": tmp}
                    r = in_subprocess(job)
                    results[method, d, n] = r
                    if "error" not in r:
                        last[method] = (n, r)
                    print(f"d={d} N={n} {method}: {r}", file=sys.stderr)
        print(exact_table(results, tmp, dims, sizes, methods))
        if approx:
            print(approx_table(results, tmp, dims, sizes, approx, args.k))
        if args.plot:
            plot(results, dims, sizes, ["dn2", *[m for m in methods if m != "dn2"], *approx], args.plot)
            print(f"\nplot: {args.plot}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _load(tmp: str, kind: str, method: str, d: int, n: int) -> np.ndarray | None:
    path = Path(tmp) / f"{method}-{d}-{n}-{kind}.npy"
    return np.load(path) if path.is_file() else None


def _cell_status(r: dict) -> str | None:
    if "skipped" in r:
        return f"skipped (~{r['skipped']:.0f} s predicted)"
    if "error" in r:
        return f"failed: {r['error'][:60]}"
    return None


def _reference(tmp: str, d: int, n: int) -> str:
    """The method whose scores/indices the others are compared with: dn2 with fp32 screening if run, else dn2."""
    return "dn2_fp32" if _load(tmp, "scores", "dn2_fp32", d, n) is not None else "dn2"


def exact_table(results: dict, tmp: str, dims: list[int], sizes: list[int], methods: list[str]) -> str:
    """Markdown: per (d, N, method) fit/search time, speed-up of dn2's default, peak memory, score agreement."""
    from dn2.search import recall_at_k

    lines = ["## Exact search", "",
             "| d | N | method | fit s | search s | total s | dn2 default speed-up | peak RSS delta | "
             "max rel. score diff vs dn2 fp32 | recall vs dn2 fp32 |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for d in dims:
        for n in sizes:
            ref_method = _reference(tmp, d, n)
            ref, ref_idx = _load(tmp, "scores", ref_method, d, n), _load(tmp, "idx", ref_method, d, n)
            dn2_total = None
            for method in ["dn2", *[m for m in methods if m != "dn2"]]:
                r = results.get((method, d, n))
                if r is None:
                    continue
                status = _cell_status(r)
                if status:
                    lines.append(f"| {d} | {n} | {label(method)} | {status} | | | | | | |")
                    continue
                total = r["fit"] + r["search"]
                if method == "dn2":
                    dn2_total = total
                scores, idx = _load(tmp, "scores", method, d, n), _load(tmp, "idx", method, d, n)
                diff = "" if ref is None or scores is None else f"{np.max(np.abs(scores - ref) / np.abs(ref)):.1e}"
                recall = "" if ref_idx is None or idx is None else f"{recall_at_k(idx, ref_idx):.4f}"
                speed = "" if dn2_total is None or method == "dn2" else f"{total / dn2_total:.1f}x"
                name = label(method) + (f" -> {r['precision']}" if method == "dn2" and "precision" in r else "")
                if r.get("uncertified"):
                    name += f", {r['uncertified']} queries redone in fp32"  # not certified by the screening
                lines.append(f"| {d} | {n} | {name} | {r['fit']:.2f} | {r['search']:.2f} | {total:.2f} | "
                             f"{speed} | {_fmt_bytes(r['peak'])} | {diff} | {recall} |")
    return "\n".join(lines)


def approx_table(results: dict, tmp: str, dims: list[int], sizes: list[int], approx: list[str], k: int) -> str:
    """Markdown: build/search time, recall@k vs exact, search throughput relative to dn2 exact."""
    lines = ["", "## Approximate search", "",
             f"| d | N | index | build s | search s | recall@{k} | throughput vs dn2 exact (default) | peak RSS delta |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    from dn2.search import recall_at_k

    for d in dims:
        for n in sizes:
            exact_idx = _load(tmp, "idx", _reference(tmp, d, n), d, n)
            exact = results.get(("dn2", d, n), {})
            for method in approx:
                r = results.get((method, d, n))
                if r is None:
                    continue
                status = _cell_status(r)
                if status:
                    lines.append(f"| {d} | {n} | {label(method)} | {status} | | | | |")
                    continue
                idx = _load(tmp, "idx", method, d, n)
                recall = "" if exact_idx is None or idx is None else f"{recall_at_k(idx, exact_idx):.4f}"
                ratio = f"{exact['search'] / r['search']:.1f}x" if "search" in exact else ""
                lines.append(f"| {d} | {n} | {label(method)} | {r['fit']:.2f} | {r['search']:.2f} | {recall} | "
                             f"{ratio} | {_fmt_bytes(r['peak'])} |")
    return "\n".join(lines)


def plot(results: dict, dims: list[int], sizes: list[int], methods: list[str], path: str) -> None:
    """Log-log fit+search time vs N, one panel per dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for method in methods:
            pts = [(n, r["fit"] + r["search"]) for n in sizes
                   if (r := results.get((method, d, n))) and "fit" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label(method))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training embeddings N")
        ax.set_ylabel("fit + score 10^4 queries (s)")
        ax.set_title(f"d = {d}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
