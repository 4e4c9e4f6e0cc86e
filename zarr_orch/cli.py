"""The `zarr-orch` command line: run the demo, see how far a run got, describe and picture products.

Commands: ``demo`` (run the demo pipeline), ``status OUT`` (each product's done/total tiles;
a product's tile map), ``info PRODUCT`` (arrays, shapes, dtypes, chunks, fill values,
metadata), ``quicklook PRODUCT -o out.png`` (a PNG with the tile status overlaid) and
``export PRODUCT OUT.tif`` (a Cloud-Optimized GeoTIFF of one tag).
Errors are one clear line on stderr and a non-zero exit code; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger("zarr_orch.cli")

#: exit code of a command that failed on its input (argparse uses 2 for usage errors)
EXIT_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )
    parser = argparse.ArgumentParser(
        prog="zarr-orch",
        description="Tiled raster pipelines that stream every tile into Zarr chunks.",
        epilog="Run 'zarr-orch COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        parents=[debug],
        help="run the two-stage demo pipeline on generated data",
        description="Run the two-stage demo pipeline on generated data.",
    )
    demo.add_argument(
        "--out",
        default="zarr_orch_demo_out",
        help="output directory or fsspec URL (default: ./zarr_orch_demo_out)",
    )
    demo.add_argument(
        "--mode",
        default=None,
        help="execution mode (default: the library default, multiprocessing)",
    )
    demo.add_argument("--workers", type=int, default=None, help="number of workers")
    demo.add_argument("--size", type=int, default=2048, help="raster size in pixels (square)")
    demo.add_argument("--tile", type=int, default=512, help="tile size in pixels")

    status = sub.add_parser(
        "status",
        parents=[debug],
        help="how far a run got: done/total tiles of each product",
        description="List a run's products with their done/failed/total tiles and last "
        "update (from the completion records and metadata.json). Given a product instead "
        "of a run directory, draw its tile map (# done, . missing, X failed).",
    )
    status.add_argument("out", metavar="OUT", help="run output directory (or one product)")
    status.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    _add_verify_parser(sub, debug)
    _add_export_parser(sub, debug)

    info = sub.add_parser(
        "info",
        parents=[debug],
        help="describe a product: arrays, shapes, dtypes, chunks",
        description="Describe a product: its arrays (shape, dtype, chunks, fill value, "
        "dims), its zarr_orch attributes, its tile progress and its run's metadata.",
    )
    info.add_argument("product", metavar="PRODUCT", help="product path or URL (a .zarr group)")
    info.add_argument("--json", action="store_true", help="print JSON")

    quick = sub.add_parser(
        "quicklook",
        parents=[debug],
        help="save a PNG of a product with its tile status",
        description="Save a picture of one tag of a product, tile grid and tile status "
        "(missing, failed) overlaid; the product is read decimated. Needs matplotlib "
        "(pip install 'zarr-orch[plot]').",
    )
    quick.add_argument("product", metavar="PRODUCT", help="product path or URL (a .zarr group)")
    quick.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.png",
        help="image file to write (format from the suffix, e.g. .png)",
    )
    quick.add_argument("--tag", default=None, help="tag to show (default: the first one)")
    quick.add_argument(
        "--max-size",
        type=int,
        default=1024,
        help="read at most this many pixels per side (default: 1024)",
    )
    quick.add_argument("--width", type=int, default=800, help="image width in pixels")
    quick.add_argument("--height", type=int, default=600, help="image height in pixels")
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from zarr_orch.demo import run_demo

    conf: dict[str, Any] = {}
    if args.mode:
        conf["mode"] = args.mode
    if args.workers is not None:
        conf["nb_workers"] = args.workers
    result = run_demo(args.out, conf or None, size=args.size, tile=args.tile)
    print(
        f"demo done: {result.tiles} tiles of {result.tile}x{result.tile} px per stage, "
        f"{result.size}x{result.size} raster; this run computed {result.computed} tiles and "
        f"resumed {result.resumed} done by an earlier run"
    )
    print(f"products in {result.out_dir}:")
    for file_name, url in result.products.items():
        print(f"  {url}    (registered as {file_name})")
    for line in demo_hints(result.out_dir, next(iter(result.products.values()))):
        print(line)
    return 0


def demo_hints(out_dir: str, product: str) -> list[str]:
    """What to run next, as commands that work when copied (none for in-memory products:
    they ended with this process)."""
    from zarr_orch.commands import cli_command, python_command, shell_join

    if out_dir.startswith("memory://"):
        return [
            "the products were in this process's memory (memory://) and are gone now that "
            "the demo has ended; use --out DIR (or an object store URL) to keep them"
        ]
    code = f"import zarr_orch; print(zarr_orch.open_product({json.dumps(product)}))"
    return [
        f"see how far it got with: {cli_command()} status {shell_join(out_dir)}",
        f"open one with: {python_command()} -c {shell_join(code)}",
    ]


def _cmd_status(args: argparse.Namespace) -> int:
    from zarr_orch.status import is_product, open_run, status_map, summarize_product, tile_status

    if is_product(args.out):
        summary = summarize_product(args.out)
        if summary.error:
            raise _CliError(summary.error)
        status = tile_status(args.out)
        if args.json:
            payload = summary.to_dict()
            payload["tiles"] = status.values.tolist()
            print(json.dumps(payload, indent=2))
            return 0
        _print_products([summary])
        print(
            f"tile map ({status.shape[0]} rows x {status.shape[1]} cols; "
            "# done, . missing, X failed):"
        )
        if status.shape[1] <= 200:
            print(status_map(status))
        else:
            print("  (too wide to draw; use --json)")
        return 0
    run = open_run(args.out)
    if args.json:
        print(json.dumps(run.to_dict(), indent=2, default=str))
        return 0
    meta = run.run
    print(f"run {run.out_dir}")
    if meta:
        stats = meta.get("stats") or {}
        print(
            f"  run id {meta.get('run_id')}, started {meta.get('started')}, updated "
            f"{meta.get('updated')}, mode {(meta.get('conf') or {}).get('mode')}"
        )
        if stats:
            print(
                f"  {stats.get('tiles', 0)} tiles computed, {stats.get('failed', 0)} failed, "
                f"{stats.get('bytes', 0) / 1e6:.1f} MB in {stats.get('seconds', 0):.1f} s "
                f"over {stats.get('breakpoints', 0)} breakpoint(s)"
            )
        if run.log_file:
            print(f"  log: {run.log_file}")
        for failed in (meta.get("failed_tiles") or [])[:5]:
            print(
                f"  failed: tile ({failed.get('row')}, {failed.get('col')}) of "
                f"{failed.get('dataset')}: {str(failed.get('error', '')).splitlines()[0][:120]}"
            )
    else:
        print("  (no metadata.json)")
    _print_products(run.products)
    return 0


def _print_products(products: list[Any]) -> None:
    if not products:
        print("  no products")
        return
    width = max(len(p.name) for p in products)
    print(
        f"  {'product':{width}s}  {'kind':6s}  {'done/total':>11s}  {'failed':>6s}  "
        f"{'state':8s}  last update"
    )
    for p in products:
        if p.error:
            print(f"  {p.name:{width}s}  error: {p.error}")
            continue
        done = f"{p.tiles_done}/{p.tiles_total}"
        print(
            f"  {p.name:{width}s}  {p.kind or '?':6s}  {done:>11s}  {p.tiles_failed:>6d}  "
            f"{p.state:8s}  {p.last_update or '-'}"
        )


def _json_value(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _cmd_info(args: argparse.Namespace) -> int:
    from zarr_orch.reading import find_run_metadata, read_product_info
    from zarr_orch.status import tile_status
    from zarr_orch.storage.core.handles import open_group
    from zarr_orch.storage.core.location import Location

    location = Location.parse(args.product)
    info = read_product_info(location)
    group = open_group(location, "r")
    arrays = {}
    for name in sorted(group.array_keys()):
        array = group[name]
        attrs = dict(array.attrs)
        arrays[name] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "chunks": list(array.chunks),
            "fill_value": _json_value(array.fill_value),
            "_FillValue": attrs.get("_FillValue"),
            "dims": list(array.metadata.dimension_names or []),
        }
    metadata = find_run_metadata(location, info)
    status = tile_status(location, metadata=metadata)
    tiles = {
        k: status.attrs[k]
        for k in ("tiles_done", "tiles_missing", "tiles_failed", "tiles_total", "last_update")
    }
    run = dict((metadata or {}).get("zarr_orch") or {})
    run_summary = (
        {k: run.get(k) for k in ("run_id", "started", "updated", "out_dir")} if run else None
    )
    payload = {
        "product": location.url,
        "zarr_orch": info,
        "tiles": tiles,
        "arrays": arrays,
        "run": run_summary,
        "metadata": metadata,
    }
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
        return 0
    print(
        f"product {location.url} ({info.get('kind')}, dataset {info.get('dataset')}, "
        f"format version {info.get('format_version')})"
    )
    size = (
        f", tile size {tuple(info.get('tile_size') or ())}" if info.get("kind") == "arrays" else ""
    )
    print(
        f"  tiles: {tiles['tiles_done']}/{tiles['tiles_total']} done, "
        f"{tiles['tiles_failed']} failed{size}, last update {tiles['last_update'] or '-'}"
    )
    if run_summary:
        print(
            f"  run: {run_summary['run_id']} (started {run_summary['started']}, updated "
            f"{run_summary['updated']})"
        )
    for name, desc in arrays.items():
        print(
            f"  {name:12s} {desc['dtype']:8s} shape={tuple(desc['shape'])} "
            f"chunks={tuple(desc['chunks'])} fill={desc['fill_value']} dims={desc['dims']}"
        )
    user = {k: v for k, v in (metadata or {}).items() if k != "zarr_orch"}
    if user:
        print(f"  metadata: {json.dumps(user, default=str)[:200]}")
    return 0


def _cmd_quicklook(args: argparse.Namespace) -> int:
    from zarr_orch.quicklook import quicklook

    if args.width < 50 or args.height < 50:
        raise _CliError("--width and --height must be at least 50 pixels")
    dpi = 100
    quicklook(
        args.product,
        tag=args.tag,
        out=args.output,
        max_size=args.max_size,
        figsize=(args.width / dpi, args.height / dpi),
        dpi=dpi,
    )
    print(f"quicklook written to {args.output}")
    return 0


#: exit codes of `zarr-orch verify`: clean, problems found, could not verify
VERIFY_OK, VERIFY_PROBLEMS, VERIFY_ERROR = 0, 1, 2


def _add_verify_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    verify = sub.add_parser(
        "verify",
        parents=[debug],
        help="re-read every recorded tile and check it against its completion record",
        description="Re-read every recorded tile of a run's products (or of one product) and "
        "compare its data with the CRC32 in its completion record: reports missing, "
        "truncated or altered chunks and malformed records. Exit code 0: all good, "
        "1: problems found, 2: could not verify. Temp files killed writers left are listed "
        "(not problems). With --repair, the records of bad tiles are deleted so that the "
        "next run recomputes exactly those tiles, and the temp files are deleted.",
    )
    verify.add_argument("out", metavar="OUT", help="run output directory (or one product)")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="forget the records of bad tiles (the next run recomputes them) and delete "
        "temp files killed writers left",
    )
    verify.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def _cmd_verify(args: argparse.Namespace) -> int:
    from zarr_orch.storage.readers.verify import verify_run

    try:
        report = verify_run(args.out, repair=args.repair)
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        print(f"zarr-orch verify: error: {_one_line(exc)}", file=sys.stderr)
        return VERIFY_ERROR
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
    return VERIFY_OK if report.ok else VERIFY_PROBLEMS


def _add_export_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export",
        parents=[debug],
        help="write one tag of a product to a Cloud-Optimized GeoTIFF",
        description="Write one tag of a raster product to a GeoTIFF (Cloud-Optimized by "
        "default: tiled, compressed, with overviews), tile by tile with bounded memory. "
        "Tiles not recorded as done are written as nodata and counted.",
    )
    export.add_argument("product", metavar="PRODUCT", help="product path or URL (a .zarr group)")
    export.add_argument("output", metavar="OUT.tif", help="GeoTIFF path or URL to write")
    export.add_argument("--tag", default=None, help="tag to export (needed if several)")
    export.add_argument(
        "--no-cog", action="store_true", help="plain tiled GeoTIFF instead of a COG"
    )
    export.add_argument("--compress", default="deflate", help="compression (default: deflate)")
    export.add_argument("--blocksize", type=int, default=512, help="tile size (default: 512)")
    export.add_argument(
        "--overviews",
        default="auto",
        help="'auto' (default), 'none' or factors such as 2,4,8",
    )
    export.add_argument(
        "--resampling", default="nearest", help="overview resampling (default: nearest)"
    )
    export.add_argument("--nbits", type=int, default=None, help="GDAL NBITS (bits per sample)")


def _cmd_export(args: argparse.Namespace) -> int:
    from zarr_orch.storage.writers.geotiff import write_geotiff

    overviews: Any = args.overviews
    if overviews not in ("auto", "none"):
        try:
            overviews = [int(v) for v in overviews.split(",")]
        except ValueError:
            raise _CliError(
                f"--overviews must be auto, none or factors like 2,4,8; got {args.overviews!r}"
            ) from None
    report = write_geotiff(
        args.product,
        args.tag,
        args.output,
        cog=not args.no_cog,
        compress=args.compress,
        blocksize=args.blocksize,
        overviews=overviews,
        resampling=args.resampling,
        nbits=args.nbits,
    )
    bands, height, width = report.shape
    print(f"wrote {report.dest}: {bands} band(s) of {height}x{width} in {report.seconds:.1f} s")
    if report.missing_tiles:
        print(f"{report.missing_tiles} tile(s) not recorded as done were written as nodata")
    return 0


class _CliError(Exception):
    """A command-line usage problem found after parsing (one line, exit code 1)."""


COMMANDS = {
    "demo": _cmd_demo,
    "status": _cmd_status,
    "info": _cmd_info,
    "quicklook": _cmd_quicklook,
    "verify": _cmd_verify,
    "export": _cmd_export,
}


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (tracebacks carried in messages are cut)."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError) and getattr(
        exc, "filename", None
    ):
        first = f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return first


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zarr-orch` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        hint = " (run with --debug for details)" if "\n" in str(exc).strip() else ""
        print(f"zarr-orch {args.command}: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
