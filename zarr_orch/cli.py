"""The `zarr-orch` command line: run the demo pipeline, describe products.

Errors are one clear line and a non-zero exit code; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger("zarr_orch.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zarr-orch",
        description="Tiled raster pipelines that stream every tile into Zarr chunks.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the two-stage demo pipeline on generated data")
    demo.add_argument("--out", default="zarr_orch_demo_out",
                      help="output directory or fsspec URL (default: ./zarr_orch_demo_out)")
    demo.add_argument("--mode", default=None,
                      help="execution mode (default: the library default, multiprocessing)")
    demo.add_argument("--workers", type=int, default=None, help="number of workers")
    demo.add_argument("--size", type=int, default=2048, help="raster size in pixels (square)")
    demo.add_argument("--tile", type=int, default=512, help="tile size in pixels")

    info = sub.add_parser("info", help="describe a product: arrays, shapes, dtypes, chunks")
    info.add_argument("product", help="product path or URL (a .zarr directory)")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from zarr_orch.demo import run_demo

    conf: dict[str, Any] = {}
    if args.mode:
        conf["mode"] = args.mode
    if args.workers is not None:
        conf["nb_workers"] = args.workers
    result = run_demo(args.out, conf or None, size=args.size, tile=args.tile)
    print(f"demo done: {result.tiles} tiles of {result.tile}x{result.tile} px per stage, "
          f"{result.size}x{result.size} raster")
    print(f"products in {result.out_dir}:")
    for file_name, url in result.products.items():
        print(f"  {url}    (registered as {file_name})")
    print(f"open one with: python -c \"import zarr_orch; "
          f"print(zarr_orch.open_product('{next(iter(result.products.values()))}'))\"")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from zarr_orch.storage.location import Location
    from zarr_orch.storage.product import open_group, product_info

    location = Location.parse(args.product)
    info = product_info(location)
    if info is None:
        raise FileNotFoundError(f"no zarr_orch product at {location.url}")
    group = open_group(location, "r")
    arrays = {}
    for name in sorted(group.array_keys()):
        array = group[name]
        arrays[name] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "chunks": list(array.chunks),
            "fill_value": array.fill_value.item() if hasattr(array.fill_value, "item")
            else array.fill_value,
            "dims": list(array.metadata.dimension_names or []),
        }
    payload = {"product": location.url, "zarr_orch": info, "arrays": arrays}
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
        return 0
    print(f"product {location.url} ({info.get('kind')}, dataset {info.get('dataset')})")
    for name, desc in arrays.items():
        print(f"  {name:12s} {desc['dtype']:8s} shape={tuple(desc['shape'])} "
              f"chunks={tuple(desc['chunks'])} fill={desc['fill_value']} dims={desc['dims']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zarr-orch` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {"demo": _cmd_demo, "info": _cmd_info}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"zarr-orch {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
