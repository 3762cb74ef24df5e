"""The ``dn2`` command: fit, score, demo, backbones (and bench, see dn2.bench).

Examples:
    dn2 fit normal_images/ -o parts.dn2
    dn2 score parts.dn2 new_images/ --csv scores.csv --explain 3
    dn2 demo
    dn2 backbones
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
from pathlib import Path
from typing import Iterator, Sequence

from .backbones import DEFAULT_BACKBONE, BackboneWeightsError, list_backbones
from .bench import add_bench_parser
from .detector import PRESETS
from .features import PRECISIONS, RUNTIMES
from .images import BadImageError
from .modelfile import ModelFileError
from .normalize import NORMALIZATIONS

EXPECTED_ERRORS = (BadImageError, ModelFileError, BackboneWeightsError, FileNotFoundError, FileExistsError, ValueError)


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="local backbone weights file (safetensors or state dict)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="inference precision (default: auto = bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="inference runtime (default: auto = openvino when installed, else onnx/torch)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the runtime's fastest)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: auto)")
    p.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
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
    from .search import make_index

    out = Path(args.output)
    if out.exists() and not args.force:  # fail before the (long) embedding, not after
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    index_params = _index_params(args.index_param)
    make_index(args.index, **index_params)  # unknown kinds or parameters fail now, not after embedding
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
        index_params=index_params or None,
        batch_size=args.batch_size,
        num_workers=args.workers,
        precision=args.precision,
        runtime=args.runtime,
        progress=not args.quiet,
        skip_bad=args.skip_bad,
    ).fit(_inputs(args.images))
    model.save(out, force=args.force)
    det = model.detector
    print(
        f"fitted on {len(det.kept_)} of {len(det.train_scores_)} images "
        f"({len(det.memory_)} embeddings kept), threshold {det.threshold_:.4f}; saved {out}"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .detector import DN2, load

    if args.csv and Path(args.csv).exists() and not args.force:
        raise FileExistsError(f"{args.csv} exists; pass --force to overwrite it")
    model = load(args.model, weights=args.weights)
    if not isinstance(model, DN2):
        raise ValueError(f"{args.model} holds a detector on embeddings, not an image model")
    model.set_params(progress=not args.quiet, skip_bad=args.skip_bad, precision=args.precision,
                     runtime=args.runtime, batch_size=args.batch_size, num_workers=args.workers)
    emb = model.embed(_inputs(args.images))
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
    if args.csv:
        fields = list(rows[0]) if rows else ["image", "anomaly_score", "verdict"]
        for r in rows:
            fields += [f for f in r if f not in fields]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dn2", description="Deep Nearest Neighbor image anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a model on a folder (or files, or a zip) of normal images")
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

    p = sub.add_parser("score", help="score images with a fitted model")
    p.add_argument("model", help="model file written by dn2 fit")
    p.add_argument("images", nargs="+", help="folder(s), zip archive(s) or image files")
    p.add_argument("--csv", help="also write the scores to this CSV file")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="show the N nearest normal training images")
    p.add_argument("--force", action="store_true", help="overwrite an existing CSV file")
    _add_runtime_options(p)
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

    add_bench_parser(sub)
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
        return 2
    except KeyboardInterrupt:
        print("dn2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
