"""int8 against fp32 and bf16 on this CPU: network only, end to end ``dn2 fit``, calibration, accuracy.

``speed`` (one run, every figure side by side, each measurement in its own process):

- the CPU's roofs: OpenVINO convolution peaks of ResNet-shaped layers in f32, bf16 (where native)
  and int8 (a FakeQuantize-fed convolution, which OpenVINO runs on int8 kernels), and per backbone
  the GFLOP per image split into the layers dn2's int8 recipe keeps float (early layers, depthwise
  convolutions) and the rest, so the int8 roof is that of the mixed network;
- network only: dn2's OpenVINO runner on uint8 crops in memory (batch 16);
- end to end: ``dn2.DN2(...).fit`` on a folder of CIFAR-10 JPEGs (decoding, resizing, embedding and
  the kNN index; for int8 with the network already in the cache: the warm fit), as a fraction of the
  network-only rate (decoding runs in worker processes and must stay hidden) and against the
  plain torchvision fp32 pipeline of benchmarks/extraction.py on the same images;
- int8 calibration: a cold fit (empty int8 cache: NNCF imported, the sample quantised) minus the
  warm fit, against the warm fit of the same images;
- the same int8 network's embeddings with the ISA restricted (``--isa AVX2``: the whole job runs
  under ``ONEDNN_MAX_CPU_ISA=AVX2``, oneDNN's dispatcher limit: AVX2 kernels without VNNI) vs
  native: dn2's 7-bit weights make them equal.

``accuracy``: CIFAR-10 one class normal in turn; test images scored by ``KNNDetector`` (k=2) on the
embeddings of the ``paper`` (Lite0, raw) and ``best`` (Lite0 + Lite2, sqrt_l2 each) methods in fp32 and
int8; mean ROCAUC (``dn2.bench.rocauc``) and the Spearman rank correlation of each class's test scores
int8 vs fp32. ``--calibration per-class`` quantises on each normal class's own training images, as
``DN2(precision="int8").fit`` does (one network per class and backbone, the test set embedded by each);
``generic`` quantises once on the training split, as ``dn2 bench --precision int8`` does.

Usage (2 cores; speed about 40 minutes, accuracy on the default subset about 30):
    python benchmarks/int8.py speed
    python benchmarks/int8.py speed --images 300 --backbones efficientnet_lite0 --isa native   # quick check
    python benchmarks/int8.py accuracy --data ../shared/datasets/cifar10-jpeg.zip --train-per-class 500 --test 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ENSEMBLE = "efficientnet_lite0+efficientnet_lite2"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", ENSEMBLE, "resnet101")


def _weights(backbone: str) -> str | None:
    """ImageNet weights where they are offline (the Lite nets), random ones for ResNet-101 (speed only)."""
    return "random" if "resnet" in backbone else None


def _dn2(backbone: str, precision: str):
    import dn2

    preset = "best" if backbone == ENSEMBLE else "paper"
    return dn2.DN2(preset=preset, backbone=backbone, weights=_weights(backbone), precision=precision, runtime="openvino",
                   progress=False)


def _embedder(backbone: str, precision: str):
    """The embedder a DN2 fit of ``backbone`` uses (backbone, weights, precision, runtime)."""
    from dn2 import Embedder

    return Embedder(backbone=backbone, weights=_weights(backbone), precision=precision, runtime="openvino",
                    progress=False)


# ------------------------------------------------------------------------------------------ roofs


def conv_flops(backbone: str) -> dict[str, float]:
    """GFLOP per image (2 per multiply-add) of the backbone's convolutions: those int8 keeps float (output at
    least crop/4 px high, or depthwise/grouped) and the rest; counted with forward hooks on the torch module."""
    import torch

    from dn2.backbones import load_backbone

    net = load_backbone(backbone, weights="random")
    crop = net.config.preprocessing.crop
    flops = {"float": 0.0, "int8": 0.0}

    def hook(module, inputs, output):
        n, c, h, w = output.shape
        macs = h * w * c * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        kind = "float" if h >= crop // 4 or module.groups > 1 else "int8"
        flops[kind] += 2 * macs / 1e9

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(torch.zeros(1, 3, crop, crop))
    for h in handles:
        h.remove()
    return flops


def ov_conv_rate(cin: int, cout: int, ks: int, hw: int, precision: str, seconds: float, batch: int = 16) -> float:
    """GFLOP/s of one convolution compiled by OpenVINO on this CPU: f32, bf16, or int8 (FakeQuantize on its
    input and weights, which OpenVINO's low-precision transformations turn into an int8 kernel)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([batch, cin, hw, hw], ov.Type.f32)
    w = ops.constant(rng.normal(0, 0.05, (cout, cin, ks, ks)).astype(np.float32))
    if precision == "int8":
        lo, hi = (ops.constant(np.float32(v)) for v in (0.0, 4.0))
        x_in = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        wl, wh = (ops.constant(np.float32(v)) for v in (-0.25, 0.25))
        w = ops.fake_quantize(w, wl, wh, wl, wh, 255)
    else:
        x_in = x
    conv = ops.convolution(x_in, w, [1, 1], [ks // 2] * 2, [ks // 2] * 2, [1, 1])
    model = ov.Model([ops.relu(conv)], [x])
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    data = rng.uniform(0, 4, (batch, cin, hw, hw)).astype(np.float32)
    request.infer({0: data})
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        request.infer({0: data}, share_inputs=True)
        reps += 1
    return 2 * batch * hw * hw * cin * cout * ks * ks / 1e9 * reps / (time.perf_counter() - start)


def job_peaks(precisions: list[str], seconds: float) -> dict:
    from roofline import CONV_SHAPES

    return {p: max(ov_conv_rate(*shape, p, seconds) for shape in CONV_SHAPES) for p in precisions}


# ------------------------------------------------------------------------------------------ jobs


def _crops(backbone, root: str, n: int) -> np.ndarray:
    from dn2.features import CropDataset
    from dn2.images import as_source

    data = CropDataset(as_source(root), backbone.config.preprocessing)
    return np.stack([data[i][0].numpy() for i in range(min(n, len(data)))])


def _int8_networks(backbone: str, root: str, saved: str) -> list:
    """The int8 networks of a fit on ``root``, kept in the folder ``saved`` so that every ISA's job runs the
    very same networks (a calibration under another ISA could round its statistics differently)."""
    from dn2.runtime import QuantizedNetwork

    folder = Path(saved)
    if (folder / "0.json").is_file():
        return [QuantizedNetwork((folder / f"{i}.xml").read_bytes(), (folder / f"{i}.bin").read_bytes(),
                                 json.loads((folder / f"{i}.json").read_text()))
                for i in range(len(list(folder.glob("*.json"))))]
    networks = _embedder(backbone, "int8").fit(root).int8_networks_
    folder.mkdir(parents=True, exist_ok=True)
    for i, network in enumerate(networks):
        (folder / f"{i}.xml").write_bytes(network.xml)
        (folder / f"{i}.bin").write_bytes(network.weights)
        (folder / f"{i}.json").write_text(json.dumps(dict(network.info)))
    return networks


def job_network(backbone: str, precision: str, root: str, seconds: float, saved: str) -> dict:
    """Network-only img/s (uint8 crops in memory, batch 16); an ensemble's rate is that of its backbones run one
    after the other. int8: the networks in ``saved`` (made there on first use); their embeddings of 16 crops
    are saved beside them as ``<ISA>.npy``."""
    import torch

    from dn2.runtime import get_runner

    nets = _embedder(backbone, precision).fit().networks_
    networks = _int8_networks(backbone, root, saved) if precision == "int8" else [None] * len(nets)
    seconds_per_image, outputs = 0.0, []
    for net, network in zip(nets, networks):
        runner = get_runner(net, "openvino", precision, network=network)
        batch = torch.from_numpy(_crops(net, root, 16))
        outputs.append(runner(batch).numpy())
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner(batch)
            reps += 1
        seconds_per_image += (time.perf_counter() - start) / (len(batch) * reps)
    if precision == "int8":
        np.save(Path(saved) / f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}.npy", np.hstack(outputs))
    return {"rate": 1.0 / seconds_per_image}


def job_fit(backbone: str, precision: str, root: str, limit: int, cache: str) -> dict:
    """``DN2.fit`` on the first ``limit`` JPEGs: cold (int8: empty int8 cache, NNCF imported here) and warm."""
    from dn2 import runtime
    from dn2.runtime.int8 import int8_cache_dir

    from extraction import imagefolder_files

    files = imagefolder_files(Path(root))[:limit]
    _dn2(backbone, "fp32").fit(files[:16])  # fp32 exports (the int8 networks are made from them), first-call setup
    if precision != "int8":
        _dn2(backbone, precision).fit(files[:16])
    if int8_cache_dir().parent != Path(cache):
        raise RuntimeError(f"refusing to empty {int8_cache_dir()}: not the benchmark's own cache {cache}")
    shutil.rmtree(int8_cache_dir(), ignore_errors=True)
    times = []
    for _ in range(2 if precision == "int8" else 1):
        runtime.clear_runner_cache()
        start = time.perf_counter()
        model = _dn2(backbone, precision).fit(files)
        times.append(time.perf_counter() - start)
    assert model.method_.precision == precision and len(model.detector.memory_) == len(files)
    result = {"n": len(files), "fit_s": times[-1], "cold_s": times[0]}
    if precision == "int8":  # the largest sample (fits of 3,000 images and more), into an empty folder
        from dn2.runtime import int8, openvino_runner

        seconds = 0.0
        empty = Path(tempfile.mkdtemp(prefix="calib300-", dir=cache))  # no entry of an earlier row or ISA pass
        try:
            for i, net in enumerate(_embedder(backbone, "int8").fit().networks_):
                sample = _crops(net, root, len(files))[int8.calibration_indices(len(files), 300)]
                start = time.perf_counter()
                int8.quantize(net, int8.Calibration.from_crops(sample), lambda: openvino_runner.uint8_model(net),
                              cache_dir=empty / str(i))
                seconds += time.perf_counter() - start
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        result["calib300_s"] = seconds
    return result


def job_plain(backbone: str, root: str, limit: int) -> dict:
    """benchmarks/extraction.py's plain torchvision fp32 pipeline; an ensemble runs each backbone in turn."""
    from extraction import run_plain

    runs = [run_plain(name, root, limit, seconds=1e9) for name in backbone.split("+")]
    return {"n": runs[0]["n"], "seconds": sum(r["seconds"] for r in runs)}


JOBS = {"peaks": job_peaks, "network": job_network, "fit": job_fit, "plain": job_plain}


def in_subprocess(job: dict, isa: str, cache: Path) -> dict:
    """Run one job in a fresh interpreter with the given ISA limit and dn2 cache."""
    env = {**os.environ, "DN2_CACHE": str(cache)}
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, __file__, "--_job", json.dumps(job)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{job} ({isa}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ speed


def speed(args: argparse.Namespace) -> int:
    from dn2.runtime import cpu_features

    from extraction import write_cifar
    from machine import header

    print(header("dn2 int8: network only, end to end, calibration"))
    native_bf16 = cpu_features().has_any(("avx512_bf16", "amx_bf16"))
    print(f"- images: {args.images} CIFAR-10 JPEGs (32x32, resized to 256, cropped to 224); network only: "
          f"{args.seconds:.0f} s per backbone, batch 16; 1-minute load before each row")
    print("- ISA 'AVX2' = the job run under ONEDNN_MAX_CPU_ISA=AVX2 on this CPU (AVX2 kernels, no VNNI)\n")
    tmp = Path(tempfile.mkdtemp(prefix="dn2-int8-"))
    cache = tmp / "cache"
    try:
        write_cifar(tmp / "images", args.images)
        root = str(tmp / "images")
        for isa in args.isa.split(","):
            precisions = ["fp32"] + (["bf16"] if native_bf16 and isa == "native" else []) + ["int8"]
            peaks = in_subprocess({"kind": "peaks", "precisions": precisions, "seconds": 1.0}, isa, cache)
            print(f"### ISA {isa}\n")
            print("convolution peaks (OpenVINO, best of benchmarks/roofline.py's ResNet-shaped layers, batch 16): "
                  + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + "\n")
            print("| backbone | pipeline | GFLOP/img (float + int8 part) | roof img/s | network only img/s | % of roof "
                  "| dn2 fit img/s | fit / network | vs fp32 fit | vs plain | calibration s | calibration / fit "
                  "| calibration of 300 s | calibration <= 20% from n images | load |")
            print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
            for backbone in args.backbones.split(","):
                flops = {"float": 0.0, "int8": 0.0}
                for name in backbone.split("+"):
                    for k, v in conv_flops(name).items():
                        flops[k] += v
                total = flops["float"] + flops["int8"]
                plain = in_subprocess({"kind": "plain", "backbone": backbone, "root": root, "limit": args.images}, isa, cache)
                plain_rate = plain["n"] / plain["seconds"]
                print(f"| {backbone} | plain torchvision fp32 eager | {total:.2f} | | | | {plain_rate:.1f} | | | 1.00x | | "
                      f"| | | {os.getloadavg()[0]:.1f} |", flush=True)
                fp32_fit = None
                for precision in precisions:
                    load = os.getloadavg()[0]
                    net = in_subprocess({"kind": "network", "backbone": backbone, "precision": precision, "root": root,
                                         "seconds": args.seconds, "saved": str(tmp / "networks" / backbone)}, isa, cache)
                    fit = in_subprocess({"kind": "fit", "backbone": backbone, "precision": precision, "root": root,
                                         "limit": args.images, "cache": str(cache)}, isa, cache)
                    fit_rate = fit["n"] / fit["fit_s"]
                    fp32_fit = fit_rate if precision == "fp32" else fp32_fit
                    if precision == "int8":
                        roof = 1.0 / (flops["float"] / peaks["fp32"] + flops["int8"] / peaks["int8"])
                        calib = fit["cold_s"] - fit["fit_s"]
                        # from 3,000 images on, the sample stays at 300: calibration <= 20% of the fit from n images
                        n20 = 5 * fit["calib300_s"] * fit_rate
                        calib_cells = (f"{calib:.1f} | {100 * calib / fit['fit_s']:.0f}% | {fit['calib300_s']:.1f} | "
                                       f"{n20:,.0f}")
                    else:
                        roof, calib_cells = peaks[precision] / total, " | | | "
                    print(f"| {backbone} | dn2 {precision} | {flops['float']:.2f} + {flops['int8']:.2f} | {roof:.0f} | "
                          f"{net['rate']:.1f} | {100 * net['rate'] / roof:.0f}% | {fit_rate:.1f} | "
                          f"{fit_rate / net['rate']:.2f} | {fit_rate / fp32_fit:.2f}x | {fit_rate / plain_rate:.2f}x | "
                          f"{calib_cells} | {load:.1f} |", flush=True)
            print()
        isas = args.isa.split(",")
        if "native" in isas and len(isas) > 1:
            print("same int8 network, embeddings of 16 crops, max relative difference to native:\n")
            for backbone in args.backbones.split(","):
                ref = np.load(tmp / "networks" / backbone / "native.npy")
                for isa in isas[1:]:
                    got = np.load(tmp / "networks" / backbone / f"{isa}.npy")
                    diff = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
                    print(f"- {backbone}, {isa}: {diff.max():.2e}")
        print("\nroof: GFLOP per image over the convolution peak; int8's counts the float part (early layers, "
              "depthwise convolutions) at the f32 peak and the rest at the int8 peak. fit img/s: DN2.fit of all images "
              "(decoding in 2 worker processes, embedding, index); int8 with its network cached. calibration: "
              "cold fit (empty int8 cache) minus warm fit (its sample: 10% of the images, at least 100, at most 300); "
              "calibration of 300: quantising on 300 of the images, the sample of every fit of 3,000 images or more, "
              "so calibration <= 20% of the fit from n = 5 x that time x the fit's img/s (below 3,000 images the sample "
              "is smaller than 300: where n < 3,000, the 20% are reached below that).")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------------ accuracy


def accuracy(args: argparse.Namespace) -> int:
    from scipy.stats import spearmanr

    from dn2 import Embedder, KNNDetector
    from dn2.bench import embed_dataset, limit_dataset, rocauc
    from dn2.datasets import load_dataset, subset

    from machine import header

    print(header("dn2 int8 accuracy: CIFAR-10 one class normal, int8 vs fp32"))
    ds = limit_dataset(load_dataset(args.data), args.train_per_class, args.test)
    classes = list(range(len(ds.classes)))[: args.classes]
    print(f"- {len(ds.train)} training and {len(ds.test)} test images (limit_dataset, seed 0); classes {classes}; "
          f"calibration {args.calibration}; cache {args.cache_dir or 'default'}\n")
    backbones = ("efficientnet_lite0", "efficientnet_lite2")
    options = dict(progress=False, runtime="openvino")
    fp32 = {b: embed_dataset(ds, b, cache_dir=args.cache_dir, precision="fp32", **options) for b in backbones}
    generic = ({b: embed_dataset(ds, b, cache_dir=args.cache_dir, precision="int8", **options) for b in backbones}
               if args.calibration == "generic" else None)
    methods = {"paper: Lite0 raw": (("efficientnet_lite0",), "none"),
               "best: Lite0+Lite2 sqrt_l2": (backbones, "sqrt_l2")}
    results = {m: {"fp32": [], "int8": [], "rho": [], "rel": []} for m in methods}
    start = time.perf_counter()
    for c in classes:
        train_c = subset(ds.train, ds.train.labels == c)
        is_anomaly = ds.test.labels != c
        int8_train, int8_test = {}, {}
        for b in backbones:
            if generic is not None:
                int8_train[b], int8_test[b] = generic[b].x_train[ds.train.labels == c], generic[b].x_test
            else:  # what DN2(precision="int8").fit(class c) does: a network quantised on the class's own images
                embedder = Embedder(backbone=b, precision="int8", **options).fit(train_c.source)
                int8_train[b], int8_test[b] = embedder.transform(train_c.source), embedder.transform(ds.test.source)
        for method, (names, normalize) in methods.items():
            blocks = tuple(1280 for _ in names) if len(names) > 1 else None
            scores = {}
            for kind, (tr, te) in {"fp32": ([fp32[b].x_train[ds.train.labels == c] for b in names],
                                            [fp32[b].x_test for b in names]),
                                   "int8": ([int8_train[b] for b in names], [int8_test[b] for b in names])}.items():
                det = KNNDetector(k=2, normalize=normalize, blocks=blocks).fit(np.hstack(tr))
                scores[kind] = det.anomaly_score(np.hstack(te))
                results[method][kind].append(rocauc(is_anomaly, scores[kind]))
            results[method]["rho"].append(spearmanr(scores["fp32"], scores["int8"]).statistic)
        rel = np.linalg.norm(int8_test["efficientnet_lite0"] - fp32["efficientnet_lite0"].x_test, axis=1) / \
            np.linalg.norm(fp32["efficientnet_lite0"].x_test, axis=1)
        results["paper: Lite0 raw"]["rel"].append(float(np.median(rel)))
        print(f"class {c} ({ds.classes[c]}): " + "; ".join(
            f"{m.split(':')[0]} {r['fp32'][-1]:.2f} -> {r['int8'][-1]:.2f} (rho {r['rho'][-1]:.4f})"
            for m, r in results.items()) + f"  [{time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}]",
            flush=True)
    print("\n| method | fp32 mean ROCAUC % | int8 mean ROCAUC % | int8 - fp32 (points) | largest class move | "
          "Spearman int8 vs fp32 mean | min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, r in results.items():
        f, q = np.array(r["fp32"]), np.array(r["int8"])
        print(f"| {method} | {f.mean():.3f} | {q.mean():.3f} | {q.mean() - f.mean():+.3f} | {np.abs(q - f).max():.2f} | "
              f"{np.mean(r['rho']):.4f} | {np.min(r['rho']):.4f} |")
    print(f"\nLite0 test embeddings, median relative error int8 vs fp32 per class: "
          f"{', '.join(f'{v:.3f}' for v in results['paper: Lite0 raw']['rel'])}")
    return 0


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    s = sub.add_parser("speed", help="throughput and calibration cost")
    s.add_argument("--images", type=int, default=1000, help="JPEGs fitted on (default 1000)")
    s.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated; a+b is an ensemble")
    s.add_argument("--isa", default="native,AVX2", help="native and/or an ONEDNN_MAX_CPU_ISA value (default native,AVX2)")
    s.add_argument("--seconds", type=float, default=8.0, help="network-only time per backbone (default 8)")
    a = sub.add_parser("accuracy", help="CIFAR-10 one-class ROCAUC and Spearman, int8 vs fp32")
    a.add_argument("--data", default=str(HERE.parents[1] / "shared" / "datasets" / "cifar10-jpeg.zip"))
    a.add_argument("--train-per-class", type=int, default=500)
    a.add_argument("--test", type=int, default=1000)
    a.add_argument("--classes", type=int, default=10, help="the first N classes (default all 10)")
    a.add_argument("--calibration", choices=["per-class", "generic"], default="per-class")
    a.add_argument("--cache-dir", default=None, help="embedding cache (default $DN2_CACHE)")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args._job:
        job = json.loads(args._job)
        print(json.dumps(JOBS[job.pop("kind")](**job)))
        return 0
    if args.mode == "speed":
        return speed(args)
    if args.mode == "accuracy":
        return accuracy(args)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
