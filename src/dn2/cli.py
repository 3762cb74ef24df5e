"""The ``dn2`` command: fit, score, serve, demo, backbones, bench (the paper's protocols, :mod:`dn2.bench`).

Examples:
    dn2 fit normal_images/ -o parts.dn2
    dn2 score parts.dn2 new_images/ --csv scores.csv --explain 3
    dn2 serve parts.dn2
    dn2 fit normal_parts/ -o parts.dn2 --maps spade && dn2 score parts.dn2 new_parts/ --map-dir maps/
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
from .datasets import FORMATS, MaskedDataset, describe, load_dataset
from .settings import IMAGE_SCORES, MAP_METHODS, PRESETS, Method
from .features import PRECISIONS, RUNTIMES
from .images import BadImageError
from .modelfile import ModelFileError
from .normalize import NORMALIZATIONS, STATELESS_NORMALIZATIONS
from .runtime.int8 import NNCFMissingError

# User errors: reported in one line naming the file or option, exit code 2. OSError covers the file system's
# own refusals (name too long, no permission, disk full), which are the user's to fix, not tracebacks.
EXPECTED_ERRORS = (BadImageError, ModelFileError, BackboneWeightsError, NNCFMissingError, ValueError, TypeError, OSError)

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
REPORT_EXPLAIN = 3  # nearest normals shown per image in a --report when --explain is not given
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


def _add_ray_options(p: argparse.ArgumentParser, *, fit: bool = False) -> None:
    """Options of running on a Ray cluster (the ``ray`` extra); dispatched to :mod:`dn2.ray.commands`."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="embed (and search) on Ray: alone, a local Ray for this run; 'auto' or ray://host:10001 a "
                        "running cluster (needs: pip install \"dn2[ray]\")")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="embedding actors on Ray (default: one per CPU of the cluster)")
    p.add_argument("--ray-embeddings", default=None, metavar="DIR",
                   help="keep the embeddings here as Parquet shards; a rerun resumes (default: a temporary folder)")
    if fit:
        p.add_argument("--ray-shards", type=int, default=None, metavar="N",
                       help="index shards on Ray actors (default: --ray-workers, or one per CPU)")
        p.add_argument("--ray-manifest", action="store_true",
                       help="save a manifest (*.json) of per-shard model files instead of one model file, for a "
                            "memory bank larger than one machine")


def _ray_commands() -> Any:
    """:mod:`dn2.ray.commands`, imported only when --ray is used; a clear error without the extra."""
    try:
        from .ray import commands
    except ImportError as e:
        raise ValueError(f"--ray: {e}") from None
    return commands


def _inputs(values: Sequence[str]) -> str | list[str]:
    """One folder/zip/file stays as is (folders are searched recursively); several become a list."""
    return values[0] if len(values) == 1 else list(values)


def _number_or_text(value: str) -> int | float | str:
    """A command-line value as the int or float it spells, else the text itself."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _index_params(items: Sequence[str]) -> dict[str, int | float | str]:
    """['nprobe=32', 'precision=fp32'] -> {'nprobe': 32, 'precision': 'fp32'}; make_index checks the names."""
    params: dict[str, int | float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--index-param takes KEY=VALUE, got {item!r}")
        params[key.strip()] = _number_or_text(value.strip())
    return params


def cmd_fit(args: argparse.Namespace) -> int:
    from .detector import DN2
    from .images import as_source
    from .outputs import check_output_path

    # Everything that can be wrong is checked before the (long) embedding: output path, parameters, inputs.
    out = check_output_path(args.output, force=args.force, what="model file")
    stages = _int_list(args.stages, "--stages")
    map_stages = _int_list(args.map_stages, "--map-stages")
    # Options named as DN2's parameters pass through; the others are converted here.
    same = ("preset", "backbone", "normalize", "flip", "weights", "k", "clean", "contamination", "fpr", "n_centres",
            "index", "precision", "runtime", "skip_bad", "thumbnails", "maps", "map_backbone", "map_size",
            "map_coreset", "map_k", "image_score")
    model = DN2(**{name: getattr(args, name) for name in same}, stages=stages, map_stages=map_stages,
                index_params=_index_params(args.index_param) or None, batch_size=args.batch_size,
                num_workers=args.workers, progress=not args.quiet)
    model.check_params()
    if args.ray is not None:
        return EXIT_SKIPPED if _ray_commands().fit(model, args, out) else EXIT_OK
    source = as_source(_inputs(args.images))
    model.fit(source)
    model.save(out, force=args.force)
    det = model.detector
    print(
        f"fitted on {len(det.kept_)} of {len(det.train_scores_)} images "
        f"({len(det.memory_)} embeddings kept), threshold {model.threshold_:.4f}; saved {out}"
    )
    if model.maps_ is not None:
        print(f"maps: {model.method_.maps}, {len(model.maps_.memory.patches):,} patches kept, "
              f"pixel threshold {model.pixel_threshold_:.4f}")
    for message in model.skipped_:
        print(f"skipped {message}", file=sys.stderr)
    return EXIT_SKIPPED if model.skipped_ else EXIT_OK


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """'2,-1' -> (2, -1); '' -> (); None -> None (the preset's)."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} takes integers separated by commas, got {text!r}") from None


def _write_csv(path: Path, rows: list[dict[str, str]], force: bool) -> None:
    """The score table as CSV, written atomically (a crash never leaves half a file or loses the old one)."""
    from .outputs import atomic_path

    fields = ["image", "anomaly_score", "verdict"]
    for r in rows:
        fields += [f for f in r if f not in fields and f != "reason"]
    if any("reason" in r for r in rows):
        fields.append("reason")  # why an image was skipped
    with atomic_path(path, force=force, what="CSV file") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def _score_row(name: str, score: float, neighbours: list[tuple[str, float]] | None, threshold: float) -> dict[str, str]:
    row = {"image": name, "anomaly_score": f"{score:.6f}", "verdict": "anomaly" if score > threshold else "normal"}
    for j, (nn_name, dist) in enumerate(neighbours or [], 1):
        row[f"nearest_{j}"], row[f"distance_{j}"] = nn_name, f"{dist:.6f}"
    return row


def _skipped_row(name: str, reason: str) -> dict[str, str]:
    return {"image": name, "anomaly_score": "", "verdict": "skipped", "reason": reason}


def cmd_score(args: argparse.Namespace) -> int:
    from .outputs import check_output_path
    from .review import report_records, report_target, write_report

    csv_path = check_output_path(args.csv, force=args.force, what="CSV file") if args.csv else None
    if args.report:
        report_target(args.report, force=args.force)
    if args.explain < 0:
        raise ValueError(f"--explain takes a number of neighbours >= 0, got {args.explain}")
    map_dir = _map_folder(args.map_dir) if args.map_dir else None
    if args.ray is not None:
        if args.report:
            raise ValueError("--report is made on this machine: score without --ray to write a review page")
        if map_dir is not None:
            raise ValueError("--map-dir is made on this machine: score without --ray to write anomaly maps")
        names, scores, neighbours, skipped, threshold = _ray_commands().score(args)
        rows = [_score_row(name, score, neighbours[i] if neighbours is not None else None, threshold)
                for i, (name, score) in enumerate(zip(names, scores))]
        rows += [_skipped_row(message.split(": ", 1)[0], message) for message in skipped]
    else:
        model, source = _load_for_scoring(args)
        if map_dir is not None and model.maps_ is None:
            raise ValueError(f"--map-dir: {args.model} was fitted without maps; fit it with --maps spade or --maps patchcore")
        map_paths = None
        if map_dir is not None:  # every output checked before any work
            from .maps.render import output_names, output_paths

            map_dir.mkdir(exist_ok=True)
            map_paths = output_paths(map_dir, output_names(source.names()), force=args.force)
        emb = model.embed(source)
        det = model.detector
        threshold, skipped = model.threshold_, list(emb.skipped)
        scores = det.anomaly_score(emb.vectors) if len(emb.vectors) else []
        neighbours = det.nearest(emb.vectors, args.explain) if args.explain and len(emb.vectors) else None
        rows = [_skipped_row(name, emb.errors[i]) if i in emb.errors else {} for i, name in enumerate(emb.input_names)]
        for row_number, (position, name, score) in enumerate(zip(emb.positions, emb.names, scores)):
            rows[position] = _score_row(name, score, neighbours[row_number] if neighbours is not None else None,
                                        threshold)
        located = None  # the maps' results by input position, made once for the rows, the files and the report
        if model.maps_ is not None and (map_dir is not None or args.report or model.method_.image_score != "dn2"):
            located = _score_maps(model, source, emb, rows, skipped, map_paths, force=args.force)
            if map_dir is not None:
                print(f"wrote {len(located)} map overlays and raw maps to {map_dir}")
    width = max([len(r["image"]) for r in rows] + [5])
    print(f"{'image':<{width}}  anomaly_score  verdict  (threshold {threshold:.4f})")
    for r in rows:
        extra = ""
        if args.explain:
            extra = "  nearest: " + ", ".join(
                f"{r[f'nearest_{j}']} ({r[f'distance_{j}']})" for j in range(1, args.explain + 1) if f"nearest_{j}" in r
            )
        print(f"{r['image']:<{width}}  {r['anomaly_score']:>13}  {r['verdict']:<7}{extra}")
    n_anom = sum(r["verdict"] == "anomaly" for r in rows)
    print(f"{n_anom} of {len(rows)} images flagged as anomalies" + (f"; {len(skipped)} skipped" if skipped else ""))
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    if csv_path is not None:
        _write_csv(csv_path, rows, args.force)
        print(f"wrote {csv_path}")
    if args.report:
        records = report_records(model, source, emb, args.explain or REPORT_EXPLAIN, located=located)
        details = [f"model {args.model}: {model.method_.backbone}, k={det.k}, threshold {model.threshold_:.4f}, "
                   f"{len(det.memory_)} normal images in memory" + ("" if model.thumbnails_ else " (no thumbnails)")]
        path = write_report(args.report, records, title=Path(args.model).name, details=details, force=args.force)
        print(f"wrote report {path}")
    return EXIT_SKIPPED if skipped else EXIT_OK


def _score_maps(model: Any, source: Any, emb: Any, rows: list[dict[str, str]], skipped: list[str],
                paths: list[tuple[Path, Path]] | None, *, force: bool) -> dict[int, Any]:
    """Make each scored image's anomaly map: its row gets the map's figures (and, with an image score other
    than "dn2", that score and verdict); with ``paths`` the overlay and raw map are written. Returns the
    :class:`dn2.maps.Localization` of each mapped image by input position. An image read for its
    embedding but not for its map (``--skip-bad``) is skipped."""
    from .maps.render import save_map

    threshold, pixel_threshold = model.threshold_, model.pixel_threshold_
    own_score = model.method_.image_score != "dn2"
    before, mapped = len(skipped), {}
    for loc in model.localize(source, skipped, embeddings=emb):
        heat = loc.map()
        mapped[loc.index] = loc
        row = rows[loc.index]
        if own_score:
            row.update(anomaly_score=f"{loc.image_score:.6f}",
                       verdict="anomaly" if loc.image_score > threshold else "normal")
        row.update(image_level_score=f"{loc.dn2_score:.6f}", map_score=f"{loc.map_score:.6f}",
                   flagged_pixels=f"{float((heat > pixel_threshold).mean()):.6f}")
        if paths is not None:
            save_map(paths[loc.index], source.load(loc.index), heat, pixel_threshold, force=force)
    for position in emb.positions:
        if int(position) in mapped:
            continue
        name = emb.input_names[int(position)]  # messages name the file by its path, which ends with the name
        reason = next((m for m in skipped[before:] if name in m), f"{name}: no anomaly map")
        if own_score:  # no map, so no score by the model's rule
            rows[int(position)] = _skipped_row(name, reason)
        else:  # the image-level verdict stands; the row says why its map is missing
            rows[int(position)]["reason"] = reason
    return mapped


def _load_for_scoring(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model with the caller's run options, and list the images to score: (model, source)."""
    from .detector import DN2, load
    from .images import as_source

    model = load(args.model, weights=args.weights, allow_download=args.allow_download, progress=not args.quiet,
                 skip_bad=args.skip_bad, runtime=args.runtime, batch_size=args.batch_size, num_workers=args.workers)
    if not isinstance(model, DN2):
        raise ValueError(f"{args.model} holds a detector on embeddings, not an image model")
    if args.precision is not None:
        model.set_params(precision=args.precision)
    source = as_source(_inputs(args.images))
    return model, source


def _map_folder(value: str) -> Path:
    """The --map-dir folder: an existing folder, or a new one in an existing folder (made when scoring starts)."""
    folder = Path(value)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--map-dir {folder}: exists and is not a folder")
    if not folder.exists() and not folder.parent.is_dir():
        raise ValueError(f"--map-dir {folder}: its parent folder {folder.parent} does not exist")
    return folder


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


# ----------------------------------------------------------------------------------------- serve

SERVE_EXTRA_MODULES = ("fastapi", "uvicorn", "python_multipart", "starlette", "pydantic")
MiB = 2**20


def _read_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file (first line) or --token; None when neither is given."""
    if args.token is not None and args.token_file is not None:
        raise ValueError("give the token with --token or --token-file, not both")
    if args.token_file is None:
        return args.token
    from .images import read_file

    text = read_file(args.token_file, limit=4096).decode("utf-8", "replace").strip()
    if not text:
        raise ValueError(f"{args.token_file}: the token file is empty")
    return text.splitlines()[0].strip()


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeSettings, check_listen, create_app, load_models, run
    except ImportError as e:
        if e.name not in SERVE_EXTRA_MODULES:
            raise
        print(f"dn2: error: dn2 serve needs the serve extra ({e.name} is missing): pip install \"dn2[serve]\"",
              file=sys.stderr)
        return EXIT_ERROR
    from . import config

    token = _read_token(args)
    check_listen(args.host, token=token, insecure=args.insecure)  # before the (slow) loading of the models
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    settings = ServeSettings(
        token=token, max_file_bytes=int(args.max_file_mb * MiB), max_request_bytes=int(args.max_request_mb * MiB),
        max_images=args.max_images, explain=args.explain, request_timeout=args.request_timeout,
        batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch, max_connections=args.max_connections,
    )
    if args.image_memory is not None:
        config.set_config(image_memory=args.image_memory)
    models = load_models(args.models, weights=args.weights, allow_download=args.allow_download, runtime=args.runtime)
    for served in models.values():
        info = served.info()
        print(f"model {served.name}: {served.path} ({info['backbone']}, k={info['k']}, threshold "
              f"{info['threshold']:.4f}, {info['memory_size']} normal images"
              f"{', thumbnails' if info['thumbnails'] else ''}{', maps' if info['maps'] else ''})")
    if token is None and not args.insecure:
        print("no token: only this machine can connect (--token-file FILE to require one)")
    print(f"review page and API on http://{args.host}:{args.port}/ (Ctrl-C or SIGTERM to stop)", flush=True)
    run(create_app(models, settings=settings), host=args.host, port=args.port, settings=settings)
    return EXIT_OK


def _add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``dn2 serve`` on the ``dn2`` command's subparsers (defaults from ServeSettings' documentation)."""
    p = sub.add_parser(
        "serve", help="serve models over HTTP: JSON API and a review page (needs the serve extra)",
        description="Serve fitted models: POST /v1/score, GET /v1/models, /metrics, /healthz, and a review page at /. "
                    "Listens on 127.0.0.1 only unless told otherwise; another address needs --token-file (or "
                    "--insecure). Install with: pip install \"dn2[serve]\"",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files (NAME=PATH to name one; default name: the file's stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", default=None, metavar="FILE", help="require this bearer token (first line of FILE)")
    p.add_argument("--token", default=None, help="require this bearer token (visible to other users in the process list: "
                                                 "prefer --token-file)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    p.add_argument("--max-file-mb", type=float, default=20, help="largest image file in an upload, MiB (default 20)")
    p.add_argument("--max-request-mb", type=float, default=100, help="largest request body, MiB (default 100)")
    p.add_argument("--max-images", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--image-memory", type=int, default=None, metavar="MIB",
                   help="memory one image may decode to, which bounds its pixels (default: dn2.config image_memory, 128)")
    p.add_argument("--explain", type=int, default=3, help="nearest normal images per result when a request does not say (default 3)")
    p.add_argument("--request-timeout", type=float, default=60, help="seconds a request may take (default 60)")
    p.add_argument("--batch-wait-ms", type=float, default=5, help="how long the network waits for more images to batch (default 5 ms)")
    p.add_argument("--max-batch", type=int, default=None, help="images per network run (default: the runtime's fastest)")
    p.add_argument("--max-connections", type=int, default=64, help="concurrent connections before 503 (default 64)")
    p.add_argument("--weights", help="local backbone weights file (safetensors or state dict)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help="inference runtime (default: auto)")
    p.add_argument("--allow-download", action="store_true", help="let missing backbone weights be downloaded")
    p.set_defaults(func=cmd_serve)
    return p


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
    if args.protocol == "localize":
        return cmd_localize(args)
    total = time.perf_counter()
    if args.k < 1 or args.seeds < 1:
        raise ValueError("--k and --seeds must be at least 1")
    ds = load_dataset(args.data, format=args.format)
    if isinstance(ds, MaskedDataset):
        raise ValueError(f"--data {args.data}: a dataset with defect masks; its protocol is dn2 bench localize")
    ds = limit_dataset(ds, args.max_train_per_class, args.max_test)
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


def _machine_line() -> str:
    """CPU features and load, printed beside every timing (timings on shared machines are provisional)."""
    import os

    from .runtime import cpu_features

    features = cpu_features()
    names = [name for name in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f", "avx2") if getattr(features, name, False)]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"machine: {os.cpu_count()} CPUs ({' '.join(names) or 'no AVX2'}); load average {load}"


def cmd_localize(args: argparse.Namespace) -> int:
    """``dn2 bench localize``: anomaly maps of each method x backbone against a dataset's masks."""
    from .bench.localize import limit_masked, localize

    total = time.perf_counter()
    methods = [m.strip() for m in (args.maps or "spade").split(",") if m.strip()]
    unknown = sorted(set(methods) - set(MAP_METHODS))
    if unknown:
        raise ValueError(f"--maps takes {', '.join(MAP_METHODS)} (comma-separated), got {', '.join(unknown)}")
    backbones: list[str | None] = [b.strip() for b in args.backbone.split(",") if b.strip()] if args.backbone else [None]
    ds = load_dataset(args.data, format=args.format)
    if not isinstance(ds, MaskedDataset):
        raise ValueError(f"--data {args.data}: dn2 bench localize needs ground-truth masks (an MVTec AD category, "
                         f"or Magnetic Tile Defects: --format mvtec, mtd, mtd-mixed)")
    ds = limit_masked(ds, args.max_train_per_class, args.max_test)
    print(describe(ds))
    print(_machine_line())
    tables, figures = localize(ds, methods, backbones, map_size=args.map_size, weights=args.weights,
                               map_stages=_int_list(args.map_stages, "--map-stages"),
                               precision=args.precision, runtime=args.runtime, batch_size=args.batch_size,
                               num_workers=args.workers, progress=not args.quiet, skip_bad=args.skip_bad)
    for table in tables:
        write_table(table, args.out)
        if not table.name.startswith("scores_"):
            print()
            print(format_table(table))
    for stem, _, png in figures:
        Path(args.out, f"{stem}.png").write_bytes(png)
    print(f"\nwrote {len(tables)} table(s) (CSV, markdown) and {len(figures)} example figure(s) to {args.out}")
    if args.report:
        preamble = [describe(ds), _machine_line(), f"command: dn2 {' '.join(sys.argv[1:])}"]
        shown = [t for t in tables if not t.name.startswith("scores_")]
        index = write_html(shown, args.report, title=f"dn2 bench localize: {ds.name}", preamble=preamble, figures=figures)
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
    p.add_argument("protocol", choices=[*PROTOCOLS, "all", "localize"],
                   help="which protocol (all: every one; localize: anomaly maps against the masks of an MVTec AD "
                        "category or Magnetic Tile Defects)")
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
    p.add_argument("--maps", default=None, help="localize: map methods, comma-separated (spade, patchcore; default spade); "
                   "--backbone then names the maps' backbones (default: the best preset's)")
    p.add_argument("--map-size", type=int, default=None, help="localize: images squashed to this size for the maps (default 224)")
    p.add_argument("--map-stages", default=None, metavar="I,J", help="localize: stages of the patch features (default -3,-2)")
    p.add_argument("--weights", default=None, help="localize: local backbone weights file, or 'random' (tests)")
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
    p.add_argument("--thumbnails", type=int, nargs="?", const=96, default=None, metavar="PX",
                   help="keep a small JPEG of each training image in the model file (long side PX, default 96), "
                        "shown beside verdicts by dn2 serve and dn2 score --report")
    p.add_argument("--maps", choices=MAP_METHODS, default=None,
                   help="also make anomaly maps: spade (nearest patches among the K nearest training images; the "
                        "measured best) or patchcore (one coreset bank of all training patches)")
    p.add_argument("--map-backbone", default=None, help="backbone of the patch features (preset best: efficientnet_lite2)")
    p.add_argument("--map-size", type=int, default=None, help="images squashed to this square size for the maps (default 224)")
    p.add_argument("--map-stages", default=None, metavar="I,J", help="stages of the patch features (default -3,-2: stride 8 and 16)")
    p.add_argument("--map-coreset", type=float, default=None,
                   help="share of the patches kept (default: spade 0.25 of each image's, patchcore 0.1 of all)")
    p.add_argument("--map-k", type=int, default=None, help="spade: nearest training images searched (default 10)")
    p.add_argument("--image-score", choices=IMAGE_SCORES, default=None,
                   help="with maps, the image score: dn2 (default: image-level, unchanged), combined (image-level + map, "
                        "better on defects in parts and textures) or map")
    p.add_argument("--force", action="store_true", help="overwrite an existing model file")
    _add_runtime_options(p)
    _add_ray_options(p, fit=True)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images with a fitted model", epilog=EXIT_CODES)
    p.add_argument("model", help="model file written by dn2 fit")
    p.add_argument("images", nargs="+", help="folder(s), zip archive(s) or image files")
    p.add_argument("--csv", help="also write the scores to this CSV file")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="show the N nearest normal training images")
    p.add_argument("--report", default=None, metavar="DIR",
                   help=f"also write a self-contained review page, DIR/index.html: images by score, verdicts, nearest "
                        f"normals (--explain N, default {REPORT_EXPLAIN}), heat maps where the model has them")
    p.add_argument("--map-dir", default=None, metavar="DIR",
                   help="write each image's anomaly map here (model fitted with --maps): <name>.overlay.png (heat map "
                        "over the image, predicted defects outlined) and <name>.map.npy (the raw float32 map)")
    p.add_argument("--force", action="store_true", help="overwrite an existing CSV file, report or map files")
    _add_runtime_options(p, scoring=True)
    _add_ray_options(p)
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
    _add_serve_parser(sub)
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
