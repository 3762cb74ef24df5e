"""The ``dn2`` command: fit, score, demo, backbones, bench (the paper's protocols, :mod:`dn2.bench`).

Examples:
    dn2 fit normal_images/ -o parts.dn2
    dn2 score parts.dn2 new_images/ --csv scores.csv --explain 3
    dn2 demo
    dn2 backbones
    dn2 info
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .backbones import DEFAULT_BACKBONE, BackboneWeightsError, list_backbones
from .bench import PROTOCOLS, embed_dataset, limit_dataset, normalized, run_protocols
from .bench.report import format_table, write_html, write_table
from .datasets import FORMATS, describe, load_dataset
from .settings import PRESETS, Method
from .features import PRECISIONS, RUNTIMES
from .images import BadImageError
from .modelfile import ModelFileError
from .normalize import NORMALIZATIONS, STATELESS_NORMALIZATIONS
from .runtime.int8 import NNCFMissingError

# User errors: reported in one line naming the file or option, exit code 2. OSError covers the file system's
# own refusals (name too long, no permission, disk full), which are the user's to fix, not tracebacks.
EXPECTED_ERRORS = (BadImageError, ModelFileError, BackboneWeightsError, NNCFMissingError, ValueError, TypeError, OSError)

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """exit codes: 0 done; 1 done, but some input images were skipped (--skip-bad; listed in the output
and the CSV); 2 error, nothing written; 130 interrupted"""


def _add_runtime_options(p: argparse.ArgumentParser, *, scoring: bool = False) -> None:
    p.add_argument("--weights", help="local backbone weights file (safetensors or state dict)")
    if scoring:
        p.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="inference precision (default: the one the model was fitted in; another one shifts "
                            "scores slightly and is warned about)")
        p.add_argument("--allow-download", action="store_true",
                       help="let the backbone's weights be downloaded if they are not on this machine (never by default)")
    else:
        p.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="inference precision (default: auto = bf16 on CPUs with native bf16 for methods measured "
                            "safe with it, else fp32; int8: the network quantised on a sample of the images, OpenVINO "
                            "and the int8 extra, stored in the model); recorded in the model and used again for scoring")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="inference runtime (default: auto = openvino when installed, else onnx/torch)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the runtime's fastest)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: auto)")
    p.add_argument("--skip-bad", action="store_true",
                   help="warn about unreadable images and go on (exit code 1 if any was skipped)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _inputs(values: Sequence[str]) -> str | list[str]:
    """One folder/zip/file stays as is (folders are searched recursively); several become a list."""
    return values[0] if len(values) == 1 else list(values)


def _index_params(items: Sequence[str]) -> dict[str, int | str]:
    """['nprobe=32', 'precision=fp32'] -> {'nprobe': 32, 'precision': 'fp32'}; make_index checks the names."""
    params: dict[str, int | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--index-param takes KEY=VALUE, got {item!r}")
        value = value.strip()
        params[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return params


def cmd_fit(args: argparse.Namespace) -> int:
    from .detector import DN2
    from .images import as_source
    from .outputs import check_output_path

    # Everything that can be wrong is checked before the (long) embedding: output path, parameters, inputs.
    out = check_output_path(args.output, force=args.force, what="model file")
    stages = tuple(int(v) for v in args.stages.split(",") if v.strip()) if args.stages is not None else None
    model = DN2(
        preset=args.preset,
        backbone=args.backbone,
        normalize=args.normalize,
        flip=args.flip,
        stages=stages,
        weights=args.weights,
        k=args.k,
        clean=args.clean,
        contamination=args.contamination,
        fpr=args.fpr,
        n_centres=args.n_centres,
        index=args.index,
        index_params=_index_params(args.index_param) or None,
        batch_size=args.batch_size,
        num_workers=args.workers,
        precision=args.precision,
        runtime=args.runtime,
        progress=not args.quiet,
        skip_bad=args.skip_bad,
    )
    model.check_params()
    source = as_source(_inputs(args.images))
    model.fit(source)
    model.save(out, force=args.force)
    det = model.detector
    print(
        f"fitted on {len(det.kept_)} of {len(det.train_scores_)} images "
        f"({len(det.memory_)} embeddings kept), threshold {det.threshold_:.4f}; saved {out}"
    )
    for message in model.skipped_:
        print(f"skipped {message}", file=sys.stderr)
    return EXIT_SKIPPED if model.skipped_ else EXIT_OK


def _write_csv(path: Path, rows: list[dict[str, str]], force: bool) -> None:
    """The score table as CSV, written atomically (a crash never leaves half a file or loses the old one)."""
    from .outputs import atomic_path

    fields = list(rows[0]) if rows else ["image", "anomaly_score", "verdict"]
    for r in rows:
        fields += [f for f in r if f not in fields]
    with atomic_path(path, force=force, what="CSV file") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def cmd_score(args: argparse.Namespace) -> int:
    from .detector import DN2, load
    from .images import as_source
    from .outputs import check_output_path

    csv_path = check_output_path(args.csv, force=args.force, what="CSV file") if args.csv else None
    if args.explain < 0:
        raise ValueError(f"--explain takes a number of neighbours >= 0, got {args.explain}")
    model = load(args.model, weights=args.weights, allow_download=args.allow_download, progress=not args.quiet,
                 skip_bad=args.skip_bad, runtime=args.runtime, batch_size=args.batch_size, num_workers=args.workers)
    if not isinstance(model, DN2):
        raise ValueError(f"{args.model} holds a detector on embeddings, not an image model")
    if args.precision is not None:
        model.set_params(precision=args.precision)
    source = as_source(_inputs(args.images))
    emb = model.embed(source)
    det = model.detector
    scores = det.anomaly_score(emb.vectors) if len(emb.vectors) else []
    neighbours = det.nearest(emb.vectors, args.explain) if args.explain and len(emb.vectors) else None
    rows = []
    for i, (name, score) in enumerate(zip(emb.names, scores)):
        verdict = "anomaly" if score > det.threshold_ else "normal"
        row = {"image": name, "anomaly_score": f"{score:.6f}", "verdict": verdict}
        if neighbours is not None:
            for j, (nn_name, dist) in enumerate(neighbours[i], 1):
                row[f"nearest_{j}"], row[f"distance_{j}"] = nn_name, f"{dist:.6f}"
        rows.append(row)
    width = max([len(r["image"]) for r in rows] + [5])
    print(f"{'image':<{width}}  anomaly_score  verdict  (threshold {det.threshold_:.4f})")
    for r in rows:
        extra = ""
        if neighbours is not None:
            extra = "  nearest: " + ", ".join(
                f"{r[f'nearest_{j}']} ({r[f'distance_{j}']})" for j in range(1, args.explain + 1) if f"nearest_{j}" in r
            )
        print(f"{r['image']:<{width}}  {r['anomaly_score']:>13}  {r['verdict']:<7}{extra}")
    n_anom = sum(r["verdict"] == "anomaly" for r in rows)
    print(f"{n_anom} of {len(rows)} images flagged as anomalies" + (f"; {len(emb.skipped)} skipped" if emb.skipped else ""))
    for message in emb.skipped:
        print(f"skipped {message}", file=sys.stderr)
    if csv_path is not None:
        _write_csv(csv_path, rows, args.force)
        print(f"wrote {csv_path}")
    return EXIT_SKIPPED if emb.skipped else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.per_class, args.backbone, args.k, args.precision, not args.quiet)


def cmd_backbones(args: argparse.Namespace) -> int:
    print(f"{'name':<20} {'dim':>5}  {'weights':<14} description")
    for cfg, status in list_backbones():
        print(f"{cfg.name:<20} {cfg.feature_dim:>5}  {status:<14} {cfg.description}")
    print("also: timm:<model name> for any timm model (weights from timm's hub, or --weights FILE)")
    print("weights 'offline' ship in a PyPI package; 'download' need internet once, or --weights FILE")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """What this machine runs: its CPU features, and per precision whether it is native and which runtimes run it."""
    from . import runtime
    from .runtime.int8 import nncf_available

    features = runtime.cpu_features()
    present = [name for name in features.names() if getattr(features, name)]
    print(f"CPU features: {' '.join(present) or 'none of ' + ', '.join(features.names())} (from /proc/cpuinfo)")
    installed = [name for name, cls in runtime.RUNNERS.items() if cls.available()]
    print(f"runtimes installed: {', '.join(installed)}")
    print(f"{'precision':<10} {'native here':<26} {'runtimes':<22} description")
    for name, spec in runtime.PRECISION_TABLE.items():
        native = ("yes" + (f" ({', '.join(f for f in spec.native_on if getattr(features, f))})" if spec.native_on else "")
                  if spec.is_native(features) else f"no (needs {' or '.join(spec.native_on)})")
        print(f"{name:<10} {native:<26} {', '.join(runtime.runtimes_for(name)):<22} {spec.description}")
    print(f"nncf (int8 quantisation): {'installed' if nncf_available() else 'not installed: pip install dn2[int8]'}")
    print(f"--precision auto here: {runtime.resolve_precision('auto')} (for methods measured safe in bf16; else fp32); "
          "never int8 (BENCHMARKS.md, int8)")
    return 0


# ----------------------------------------------------------------------------------------- bench

LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _backbone_list(args: argparse.Namespace) -> list[str]:
    if args.backbone:
        return [b.strip() for b in args.backbone.split(",") if b.strip()]
    return list(LITE_BACKBONES) if args.protocol in ("backbones", "all") else [DEFAULT_BACKBONE]


def _command_line(args: argparse.Namespace) -> str:
    """The options that shape the results, as a command to paste (for the report)."""
    parts = ["dn2 bench", args.protocol, "--data", str(args.data)]
    for option in ("backbone", "normalize", "k", "seeds", "max_train_per_class", "max_test", "format", "precision", "runtime"):
        value, default = getattr(args, option), {"k": 2, "seeds": 3, "format": "auto", "precision": "auto", "runtime": "auto",
                                                 "normalize": "none"}.get(option)
        if value is not None and value != default:
            parts += [f"--{option.replace('_', '-')}", str(value)]
    return " ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    """``dn2 bench``: load, (limit), embed once per backbone, run, print and write tables."""
    total = time.perf_counter()
    if args.k < 1 or args.seeds < 1:
        raise ValueError("--k and --seeds must be at least 1")
    ds = limit_dataset(load_dataset(args.data, format=args.format), args.max_train_per_class, args.max_test)
    print(describe(ds))
    names = _backbone_list(args)
    if args.protocol not in ("backbones", "all"):
        names = names[:1]  # the other protocols use the first backbone listed
    options = dict(batch_size=args.batch_size, num_workers=args.workers,
                   precision=Method(normalize=args.normalize, precision=args.precision).extraction_precision(),
                   runtime=args.runtime, progress=not args.quiet, skip_bad=args.skip_bad)
    datas = {b: embed_dataset(ds, b, cache_dir=args.cache_dir, use_cache=not args.no_cache, **options) for b in names}
    if args.normalize != "none":
        datas = {b: normalized(d, args.normalize) for b, d in datas.items()}
    tables = run_protocols(args.protocol, datas, k=args.k, seeds=args.seeds)
    for table in tables:
        print()
        print(format_table(table))
        write_table(table, args.out)
    print(f"\nwrote {len(tables)} table(s) (CSV, markdown, PNG) to {args.out}")
    if args.report:
        command = _command_line(args)
        preamble = [describe(ds), f"backbones: {', '.join(names)}; k={args.k}; seeds={args.seeds}", f"command: {command}"]
        index = write_html(tables, args.report, title=f"dn2 bench {args.protocol}: {ds.name}", preamble=preamble)
        print(f"wrote report {index}")
    print(f"total wall time {time.perf_counter() - total:.1f} s")
    return 0


def _add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``dn2 bench`` on the ``dn2`` command's subparsers."""
    p = sub.add_parser(
        "bench", help="reproduce the paper's protocols on a labelled dataset",
        description="Run the DN2 paper's protocols on a labelled dataset (class folders, zip, CIFAR, idx, CSV); "
                    "writes <protocol>.csv/.md/.png to --out. Example: dn2 bench unimodal --data cifar10.zip",
    )
    p.add_argument("protocol", choices=[*PROTOCOLS, "all"], help="which protocol (all: every one)")
    p.add_argument("--data", required=True, help="dataset: class folders (train/ test/), zip, CIFAR/MNIST files, CSV manifest")
    p.add_argument("--format", choices=FORMATS, default="auto", help="dataset format (default: detect)")
    p.add_argument("--backbone", default=None,
                   help=f"backbone(s), comma-separated (default {DEFAULT_BACKBONE}; for backbones/all: {','.join(LITE_BACKBONES)}); "
                        "protocols other than backbones use the first")
    p.add_argument("--k", type=int, default=2, help="neighbours averaged in the score (default 2)")
    p.add_argument("--normalize", choices=STATELESS_NORMALIZATIONS, default="none",
                   help="row-wise embedding transform before the kNN (default none: the paper's method)")
    p.add_argument("--seeds", type=int, default=3, help="random draws for fewshot, impurity, group (default 3)")
    p.add_argument("--out", default="bench-out", help="directory for <protocol>.csv/.md/.png, overwritten (default bench-out/)")
    p.add_argument("--report", default=None, metavar="DIR", help="also write a self-contained HTML report (index.html) with markdown and CSV here")
    p.add_argument("--no-cache", action="store_true", help="always embed, never read or write the embedding cache")
    p.add_argument("--cache-dir", default=None, help="embedding cache directory (default $DN2_CACHE or ~/.cache/dn2/embeddings)")
    p.add_argument("--max-train-per-class", type=int, default=None, metavar="N", help="use at most N random training images per class")
    p.add_argument("--max-test", type=int, default=None, metavar="N", help="use at most N random test images")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="inference precision (default: auto)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help="inference runtime (default: auto)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the runtime's fastest)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: auto)")
    p.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    return p


# ----------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dn2", description="Deep Nearest Neighbor image anomaly detection.",
                                     epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a model on a folder (or files, or a zip) of normal images", epilog=EXIT_CODES)
    p.add_argument("images", nargs="+", help="folder(s), zip archive(s) or image files of normal images")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="best",
                   help="method settings: best (default; see BENCHMARKS.md) or paper (the DN2 paper exactly)")
    p.add_argument("--backbone", default=None, help="backbone name, overrides the preset's (see dn2 backbones)")
    p.add_argument("--k", type=int, default=None, help="neighbours averaged in the score (both presets: 2)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default=None, help="embedding transform, overrides the preset's")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each embedding with its mirror image's (overrides the preset)")
    p.add_argument("--stages", default=None, metavar="I,J",
                   help="also pool these earlier stages, e.g. -2 ('' for none; overrides the preset)")
    p.add_argument("--clean", type=float, default=0.0, help="fraction of training images to drop as suspected anomalies (paper: 0.5)")
    p.add_argument("--contamination", type=float, default=None, help="expected fraction of anomalies in the training images")
    p.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate on normal images (default 0.05)")
    p.add_argument("--n-centres", type=int, default=None, help="compress the training set to this many k-means centres")
    p.add_argument("--index", default="exact", help="search: exact (default), ivf (approximate, for very large training sets), or FAISS: "
                        "flat, ivf_faiss, ivfpq, hnsw")
    p.add_argument("--index-param", action="append", default=[], metavar="KEY=VALUE",
                   help="index parameter, repeatable: e.g. --index ivf --index-param nprobe=32 (integers or fp32/bf16)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model file")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images with a fitted model", epilog=EXIT_CODES)
    p.add_argument("model", help="model file written by dn2 fit")
    p.add_argument("images", nargs="+", help="folder(s), zip archive(s) or image files")
    p.add_argument("--csv", help="also write the scores to this CSV file")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="show the N nearest normal training images")
    p.add_argument("--force", action="store_true", help="overwrite an existing CSV file")
    _add_runtime_options(p, scoring=True)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("demo", help="one-class DN2 on scikit-learn's digits (offline)")
    p.add_argument("--per-class", type=int, default=None, help="use only N images per digit (quicker)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("backbones", help="list backbones and whether their weights are available offline")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("info", help="this machine's CPU features, and the precisions and runtimes it runs")
    p.set_defaults(func=cmd_info)

    _add_bench_parser(sub)
    return parser


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (tests and callers may replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _show_library_messages() -> Iterator[None]:
    """The library logs (logger ``dn2``); the command shows its messages as ``dn2: ...`` lines on stderr."""
    logger = logging.getLogger("dn2")
    handler = _StderrHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("dn2: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _show_library_messages():
            return args.func(args)
    except EXPECTED_ERRORS as e:
        print(f"dn2: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("dn2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
