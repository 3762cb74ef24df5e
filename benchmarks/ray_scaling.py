"""DN2 on Ray (issue 15): embedding throughput with 1 and 2 workers, Ray's overhead against the
single-process ``dn2 fit``, and a worked cost model for 10^8 images from the measured figures.

Tables printed:
1. embedding on Ray: images/s with 1 and 2 embedder actors (each one CPU), from JPEG files on disk;
2. fit: single-process ``DN2.fit`` against the same fit on a local Ray (embedding actors, then the
   sharded kNN fit with leave-one-out scores, gathered into one model), same images, same CPUs;
   the overhead of Ray (target: under 15%), with and without starting the local Ray;
3. search per shard: exact kNN time per query and per 10^6 memory rows (one CPU, the method's D),
   batched and single queries; Ray's round trip (broadcast + merge) for a 2-shard query;
4. the cost model for 10^8 images built from tables 1-3 (stated assumptions: node size, memory per
   shard): embedding CPU- and node-hours, shard count and memory per shard, query latency, and
   what the exact leave-one-out pass of the fit would cost.

Images: the first ``--images`` training images (sorted by name) of CIFAR-10 (``cifar10-jpeg.zip``),
written as JPEG files to a temporary folder, as ``dn2 fit folder/`` reads them.

Usage (the final run, on a quiet machine; about 30 minutes on 2 cores with the default preset):
    python benchmarks/ray_scaling.py
    python benchmarks/ray_scaling.py --images 400 --preset paper      # quick, provisional
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import header  # noqa: E402

CIFAR_ZIP = HERE.parents[1] / "shared" / "datasets" / "cifar10-jpeg.zip"
if not CIFAR_ZIP.exists():
    CIFAR_ZIP = Path("/work/shared/datasets/cifar10-jpeg.zip")


def extract_images(n: int, folder: Path) -> Path:
    """The first n training JPEGs of the CIFAR-10 zip (sorted names), as files in folder/images."""
    out = folder / "images"
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(m for m in z.namelist() if m.startswith("train/") and m.endswith(".jpg"))[:n]
        for m in names:
            target = out / m.replace("/", "_")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(m))
    return out


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--preset", default="best", help="dn2 preset (default best: what dn2 fit uses)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--node-cpus", type=int, default=32, help="cost model: CPUs per node")
    p.add_argument("--shard-gib", type=float, default=16.0, help="cost model: memory bank per shard, GiB")
    p.add_argument("--total", type=float, default=1e8, help="cost model: images")
    args = p.parse_args()

    import ray
    import torch

    import dn2
    import dn2.ray
    from dn2.search import make_index
    from dn2.ray.sharded import merge_topk

    print(header("DN2 on Ray: scaling and cost (benchmarks/ray_scaling.py)"))
    print(f"- load average at start: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="dn2-ray-bench-"))
    images = extract_images(args.images, work)
    model = dn2.DN2(preset=args.preset, precision=args.precision, progress=False)
    method = dn2.ray.method_of(model)
    print(f"- {args.images} CIFAR-10 JPEGs (32x32); preset {args.preset}: {method.backbone}, {method.precision}, "
          f"normalize {method.normalize}, k={method.k}")

    # -- 2a. single process (first, before Ray holds the CPUs)
    t = time.perf_counter()
    single = dn2.DN2(preset=args.preset, precision=args.precision, progress=False).fit(images)
    single_s = time.perf_counter() - t

    # -- 1 and 2b. on a local Ray with all CPUs
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t
    throughput = []
    for workers in (1, 2):
        t = time.perf_counter()
        run = dn2.ray.embed_to_parquet(images, work / f"emb{workers}", method, workers=workers, shard_rows=50,
                                       progress=False)
        throughput.append((workers, time.perf_counter() - t, run))
    t = time.perf_counter()
    run = dn2.ray.embed_to_parquet(images, work / "emb-fit", method, workers=2, shard_rows=50, progress=False)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    parts = run.identity.get("parts")
    sharded = dn2.ray.ShardedKNNDetector(k=method.k, normalize=method.normalize, n_shards=args.shards,
                                         blocks=tuple(x["feature_dim"] for x in parts) if parts else None,
                                         cpus_per_shard=os.cpu_count() / args.shards).fit(run.folder)
    gathered = sharded.to_detector()
    knn_s = time.perf_counter() - t
    assert gathered.threshold_ == single.threshold_ or abs(gathered.threshold_ / single.threshold_ - 1) < 1e-5

    # -- 3. search per shard (one CPU) and Ray's round trip
    dim = run.dim
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = 20000
    bank = rng.random((rows, dim), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    index = make_index("exact").fit(bank)
    search = {}
    for batch in (1, 256):
        q = bank[:batch] + 0.01
        index.search(q, method.k)
        reps = max(1, 20 // batch)
        t = time.perf_counter()
        for _ in range(reps):
            index.search(q, method.k)
        search[batch] = (time.perf_counter() - t) / reps / batch / rows * 1e6  # s per query per 10^6 rows
    t = time.perf_counter()
    merge_topk([(np.zeros((1000, method.k), np.float32), np.zeros((1000, method.k), np.int64))] * 64, 1000, method.k)
    merge_per_query_shard = (time.perf_counter() - t) / 1000 / 64
    query = np.asarray(dn2.ray.read_embeddings(run.folder).vectors[:1])
    sharded.anomaly_score(query)
    t = time.perf_counter()
    for _ in range(10):
        sharded.anomaly_score(query)
    round_trip = (time.perf_counter() - t) / 10
    local_t = time.perf_counter()
    for _ in range(10):
        gathered.anomaly_score(query)
    # What the shards search in parallel costs 1/shards of the whole bank's search on one CPU; the rest of
    # the sharded call is Ray's: broadcast, scheduling, gathering and the merge.
    round_trip -= (time.perf_counter() - local_t) / 10 / args.shards
    sharded.shutdown()
    ray.shutdown()

    cpus = os.cpu_count()
    table("Embedding on Ray (CPU: see flags above; shards of 50 images)",
          ["embedder actors", "seconds", "images/s", "actor-s per image, steady (start-up excluded)"],
          [[str(w), f"{s:.1f}", f"{args.images / s:.1f}", f"{r.busy_seconds / args.images:.4f}"]
           for w, s, r in throughput])
    ray_total = embed_s + knn_s
    table(f"Fit: single process against Ray, {args.images} images, {cpus} CPUs",
          ["", "seconds", "overhead"],
          [["single-process DN2.fit (dn2 fit)", f"{single_s:.1f}", ""],
           ["Ray: embed (2 actors)", f"{embed_s:.1f}", ""],
           [f"Ray: sharded kNN fit ({args.shards} shards) + gather", f"{knn_s:.1f}", ""],
           ["Ray: total, cluster running", f"{ray_total:.1f}", f"{100 * (ray_total / single_s - 1):+.1f}%"],
           ["Ray: total with a local Ray started", f"{ray_total + ray_start_s:.1f}",
            f"{100 * ((ray_total + ray_start_s) / single_s - 1):+.1f}%"]])
    table(f"Search per shard (one CPU, D={dim}, exact index)", ["", "value"],
          [["single query: s per 10^6 rows", f"{search[1]:.4f}"],
           ["batch of 256: s per query per 10^6 rows", f"{search[256]:.5f}"],
           ["merge on the driver: s per query per shard", f"{merge_per_query_shard:.2e}"],
           [f"Ray round trip of one query over {args.shards} shards, beyond the search", f"{round_trip * 1e3:.1f} ms"]])

    # -- 4. cost model
    n = args.total
    per_image = throughput[0][2].busy_seconds / args.images  # CPU-s per image of one 1-CPU actor, start-up amortised
    cpu_hours = n * per_image / 3600
    bank_bytes = n * dim * 4
    shards = math.ceil(bank_bytes / (args.shard_gib * 2**30))
    rows_per_shard = n / shards
    single_latency = round_trip + rows_per_shard / 1e6 * search[1] + shards * merge_per_query_shard
    batch_latency = round_trip + 1000 * rows_per_shard / 1e6 * search[256] + 1000 * shards * merge_per_query_shard
    loo_cpu_hours = n * n / 1e6 * search[256] / 3600
    table(f"Cost model: {n:.0e} images (from the figures above)", ["quantity", "value", "how"],
          [["embedding", f"{cpu_hours:,.0f} CPU-h = {cpu_hours / args.node_cpus:,.0f} node-h",
            f"{per_image:.4f} CPU-s/image (1 actor, steady); nodes of {args.node_cpus} CPUs"],
           ["memory bank", f"{bank_bytes / 2**40:.2f} TiB", f"N x D={dim} x 4 bytes"],
           ["index shards", f"{shards} of {bank_bytes / shards / 2**30:.1f} GiB", f"at most {args.shard_gib:g} GiB each"],
           ["one query", f"{single_latency:.2f} s", "round trip + slowest shard (1 CPU) + merge"],
           ["1000 queries (one batch)", f"{batch_latency:.1f} s", "same, batched search"],
           ["exact leave-one-out at fit", f"{loo_cpu_hours:,.0f} CPU-h",
            "N^2 pairs at the batched rate, over all shards: use index=ivf at this size"]])
    print(f"\n- load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
