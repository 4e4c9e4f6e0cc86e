"""The `zarr-orch` command line: outputs, exit codes, one-line errors.

One test runs every command as a real subprocess (started together, so interpreter
start-ups overlap); the detailed checks call `main()` in-process, which is much faster.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from test_reading import FAILING, make_run

from zarr_orch import ProductError
from zarr_orch.cli import main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120

#: run the CLI with every import of matplotlib failing, as if the plot extra were missing
NO_MATPLOTLIB = """
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
from zarr_orch import ProductError
from zarr_orch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def command(*args: str) -> list[str]:
    """The argv of `zarr-orch ARGS` with this interpreter."""
    return [sys.executable, "-m", "zarr_orch.cli", *map(str, args)]


def run_many(argvs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run several commands at once; {name: completed process (text output)}."""
    procs = {
        name: subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
        for name, argv in argvs.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def run(*args: str) -> subprocess.CompletedProcess:
    return run_many({"one": command(*args)})["one"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_one_line_error(
    result: subprocess.CompletedProcess, command_name: str, fragment: str
) -> None:
    """Exit code 1, nothing on stdout, one stderr line naming the command, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"zarr-orch {command_name}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo run by the CLI itself (sequential, 256 px, 4x4 tiles)."""
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = run("demo", "--out", out, "--mode", "sequential", "--size", 256, "--tile", 64)
    assert result.returncode == 0, result.stderr
    assert "products in" in result.stdout and "terrain.zarr" in result.stdout
    return out


@pytest.fixture(scope="module")
def partial_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose tile FAILING raised: the other 7 of 8 tiles are done."""
    out = tmp_path_factory.mktemp("cli") / "partial"
    make_run(out)
    return out


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run `zarr-orch ARGS` in this process (fast): (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_as_subprocesses(demo_out: Path, partial_out: Path, tmp_path: Path) -> None:
    """Each command through a real interpreter: outputs, exit codes, PNG size, errors."""
    products = demo_out / "products.zarr"
    png = tmp_path / "quicklook.png"
    newer = tmp_path / "newer.zarr"
    shutil.copytree(partial_out / "dsm.zarr", newer)
    group = zarr.open_group(str(newer), mode="r+", zarr_format=3)
    group.attrs["zarr_orch"] = {**group.attrs["zarr_orch"], "format_version": 99}
    results = run_many(
        {
            "status_json": command("status", demo_out, "--json"),
            "info": command("info", products),
            "quicklook": command("quicklook", products, "-o", png, "--tag", "hillshade"),
            "status_product": command("status", partial_out / "dsm.zarr"),
            "quicklook_newer": command("quicklook", newer, "-o", tmp_path / "x.png"),
            "no_matplotlib": [
                sys.executable,
                "-c",
                NO_MATPLOTLIB,
                "quicklook",
                str(products),
                "-o",
                str(tmp_path / "x.png"),
            ],
        }
    )
    for name in ("status_json", "info", "quicklook", "status_product"):
        assert results[name].returncode == 0, (name, results[name].stderr)
        assert "Traceback" not in results[name].stderr, (name, results[name].stderr)
    payload = json.loads(results["status_json"].stdout)
    assert payload["complete"] is True and payload["run_id"]
    by_name = {p["name"]: p for p in payload["products"]}
    assert set(by_name) == {"terrain.zarr", "products.zarr"}
    assert (by_name["terrain.zarr"]["tiles_done"], by_name["terrain.zarr"]["tiles_total"]) == (
        16,
        16,
    )
    assert results["info"].stdout.startswith(f"product {products} (arrays, dataset derived")
    assert "tiles: 16/16 done" in results["info"].stdout
    assert png_size(png) == (800, 600) and png.stat().st_size > 5000
    assert f"quicklook written to {png}" in results["quicklook"].stdout
    assert results["status_product"].stdout.rstrip().endswith("####\n#X##")
    assert_one_line_error(
        results["quicklook_newer"], "quicklook", "newer zarr_orch (format version 99"
    )
    assert_one_line_error(
        results["no_matplotlib"], "quicklook", "quicklook needs matplotlib, which is not installed"
    )
    assert "zarr-orch[plot]" in results["no_matplotlib"].stderr
    assert not (tmp_path / "x.png").exists()


def test_help_for_every_command(capsys: pytest.CaptureFixture) -> None:
    for name in ("", "demo", "status", "info", "quicklook"):
        code, out, _ = cli(capsys, *([name] if name else []), "--help")
        assert code == 0, name
        assert out.startswith(f"usage: zarr-orch {name}".rstrip()), out
        if not name:
            assert all(c in out for c in ("demo", "status", "info", "quicklook"))
    assert "--json" in cli(capsys, "status", "--help")[1]
    assert "--tag" in cli(capsys, "quicklook", "--help")[1]
    code, _, err = cli(capsys, "quicklook", "some.zarr")
    assert code == 2 and "-o/--output" in err


def test_status_and_info_of_the_demo(demo_out: Path, capsys: pytest.CaptureFixture) -> None:
    code, status, _ = cli(capsys, "status", demo_out)
    assert code == 0
    assert f"run {demo_out}" in status and "run id " in status and "mode sequential" in status
    assert status.count("16/16") == 2 and status.count("complete") == 2
    products = demo_out / "products.zarr"
    code, info, _ = cli(capsys, "info", products)
    assert code == 0
    assert "classes      uint8    shape=(256, 256) chunks=(64, 64) fill=0" in info
    assert "run: " in info and 'metadata: {"demo": {"size": 256, "tile": 64}}' in info
    code, out, _ = cli(capsys, "info", products, "--json")
    info_json = json.loads(out)
    assert info_json["arrays"]["slope"]["fill_value"] == -9999.0
    assert info_json["arrays"]["hillshade"]["dims"] == ["y", "x"]  # georeferenced: format 2
    assert info_json["zarr_orch"]["tile_size"] == [64, 64]
    assert info_json["metadata"]["demo"] == {"size": 256, "tile": 64}
    assert info_json["tiles"]["tiles_done"] == 16


def test_status_of_a_half_finished_run(
    partial_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = cli(capsys, "status", partial_out)
    assert code == 0
    assert "7/8" in out and "failed" in out and "1 failed" in out  # and the run statistics
    # it points to the run's log, which holds the failed tile's traceback
    log_line = next(line for line in out.splitlines() if line.strip().startswith("log: "))
    log_file = Path(log_line.split("log: ", 1)[1].strip())
    assert log_file.parent == partial_out / "logs" and "Traceback" in log_file.read_text()
    assert f"failed: tile ({FAILING[0]}, {FAILING[1]})" in out
    code, out, _ = cli(capsys, "status", partial_out / "dsm.zarr", "--json")
    payload = json.loads(out)
    assert payload["tiles"][FAILING[0]][FAILING[1]] == "failed"
    assert (payload["tiles_done"], payload["tiles_total"], payload["state"]) == (7, 8, "failed")
    png = tmp_path / "partial.png"
    code, _, err = cli(
        capsys,
        "quicklook",
        partial_out / "dsm.zarr",
        "-o",
        png,
        "--tag",
        "cls",
        "--width",
        320,
        "--height",
        240,
        "--max-size",
        32,
    )
    assert code == 0, err
    assert png_size(png) == (320, 240)


def test_bad_input_is_one_clear_line(
    partial_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    newer = tmp_path / "newer.zarr"
    shutil.copytree(partial_out / "dsm.zarr", newer)
    group = zarr.open_group(str(newer), mode="r+", zarr_format=3)
    group.attrs["zarr_orch"] = {**group.attrs["zarr_orch"], "format_version": 99}
    product = partial_out / "dsm.zarr"
    cases = [
        (("info", tmp_path / "missing.zarr"), "does not exist"),
        (("info", plain), "no zarr_orch product at"),
        (("status", tmp_path / "missing"), "does not exist"),
        (("status", plain), "no zarr_orch run at"),
        (("quicklook", plain, "-o", tmp_path / "x.png"), "no zarr_orch product at"),
        (("info", newer), "newer zarr_orch (format version 99"),
        (("status", newer), "newer zarr_orch (format version 99"),
        (("quicklook", product, "-o", tmp_path / "x.png", "--tag", "no"), "has no tag 'no'"),
        (("quicklook", product, "-o", tmp_path / "no" / "dir" / "x.png"), "No such file"),
    ]
    for args, fragment in cases:
        code, out, err = cli(capsys, *args)
        result = subprocess.CompletedProcess(args, code, out, err)
        assert_one_line_error(result, str(args[0]), fragment)
    with pytest.raises(ProductError, match="no zarr_orch product at"):  # --debug: the traceback
        main(["info", str(plain), "--debug"])


def test_status_lists_an_unreadable_product_without_failing(
    partial_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "moved"
    shutil.copytree(partial_out, out)  # a moved run: products follow their out_dir
    group = zarr.open_group(str(out / "dsm.zarr"), mode="r+", zarr_format=3)
    group.attrs["zarr_orch"] = {**group.attrs["zarr_orch"], "format_version": 99}
    code, stdout, _ = cli(capsys, "status", out, "--json")
    assert code == 0
    [product] = json.loads(stdout)["products"]
    assert product["url"] == str(out / "dsm.zarr")
    assert product["state"] == "error" and "newer zarr_orch" in product["error"]
