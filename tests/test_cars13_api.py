"""CARS 1.3's orchestrator API and configurations on zarr_orch, and the GeoTIFF outputs of
registered ``.tif`` names (resume after a SIGKILL, S3 out_dir)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cars_app
import numpy as np
import pytest
import yaml

from zarr_orch import CarsDataset, fill_dataset
from zarr_orch.cars_compat import get_disparity_range_cropped, merge_dicts
from zarr_orch.conf import CARS_KEYS, validate_conf
from zarr_orch.errors import ConfigurationError, TaskFailedError
from zarr_orch.orchestrator import Orchestrator, update_saving_infos

rasterio = pytest.importorskip("rasterio")

TESTS = Path(__file__).resolve().parent
SEQ = {"mode": "sequential", "progress": False}


# -- constructor conventions ---------------------------------------------------------------------


def test_cars13_keywords_as_pipelines_pass_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Orchestrator(
        orchestrator_conf=SEQ,
        out_dir=str(out),
        log_dir=str(tmp_path / "logs"),
        out_yaml_path=str(out / "metadata.yaml"),
    ) as orch:
        assert orch.log_dir == str(tmp_path / "logs")
        assert orch.launch_worker is True
        orch.update_out_info({"app": {"value": 1}})
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert meta["app"] == {"value": 1}
    assert meta["zarr_orch"]["out_dir"] == str(out)


@pytest.mark.parametrize(
    ("args", "log_dir", "launch", "metadata"),
    [
        ((True, "meta.json"), None, True, "meta.json"),  # seed: launch_worker, out_json_path
        ((False,), None, False, "metadata.json"),
        (("logs_here", True, "meta.yaml"), "logs_here", True, "meta.yaml"),  # CARS 1.3
        ((None, True), None, True, "metadata.json"),  # None third: CARS's log_dir default
    ],
)
def test_third_positional_argument_is_told_apart_by_type(
    tmp_path: Path, args: tuple, log_dir: str | None, launch: bool, metadata: str
) -> None:
    out = tmp_path / "out"
    args = tuple(str(tmp_path / a) if isinstance(a, str) else a for a in args)
    orch = Orchestrator(SEQ, str(out), *args)
    try:
        assert orch.launch_worker is launch
        assert orch.log_dir == (str(tmp_path / log_dir) if log_dir else str(out / "logs"))
        expected = tmp_path / metadata if metadata != "metadata.json" else out / metadata
        assert orch.out_json_path == str(expected)
    finally:
        orch.cleanup()


def test_bad_constructor_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="third argument"):
        Orchestrator(SEQ, str(tmp_path), 3)
    with pytest.raises(ConfigurationError, match="launch_worker must be true or false"):
        Orchestrator(SEQ, str(tmp_path), None, "yes")
    with pytest.raises(TypeError, match="multiple values"):
        Orchestrator(SEQ, str(tmp_path), True, launch_worker=False)
    with pytest.raises(TypeError, match="at most 4 positional"):
        Orchestrator(SEQ, str(tmp_path), True, None, None)
    with pytest.raises(ConfigurationError, match="not both"):
        Orchestrator(SEQ, str(tmp_path), out_json_path="a.json", out_yaml_path="b.yaml")
    with pytest.raises(TypeError, match="unexpected keyword"):
        Orchestrator(SEQ, str(tmp_path), log_directory="x")
    assert not (tmp_path / "metadata.json").exists()


# -- configurations --------------------------------------------------------------------------------


def test_cars_multiprocessing_conf_is_accepted_and_resolved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conf = {
        "mode": "multiprocessing",
        "nb_workers": "auto",
        "max_ram_per_worker": 1500,
        "dump_to_disk": False,
        "per_job_timeout": 300,
        "factorize_tasks": True,
        "max_tasks_per_worker": 10,
        "task_timeout": 600,
        "mp_mode": "forkserver",
        "profiling": {"mode": "cars_profiling"},
    }
    with caplog.at_level(logging.INFO, logger="zarr_orch.conf"):
        _, checked = validate_conf(conf)
    assert isinstance(checked["nb_workers"], int) and checked["nb_workers"] >= 1
    assert checked["max_ram_per_worker"] == 1500
    assert checked["dump_to_disk"] is False and checked["per_job_timeout"] == 300
    lines = [r.getMessage() for r in caplog.records if "without effect" in r.getMessage()]
    assert len(lines) == 1
    for key in ("dump_to_disk", "per_job_timeout", "factorize_tasks"):
        assert key in lines[0]


def test_cars_sequential_and_dask_confs(tmp_path: Path) -> None:
    _, checked = validate_conf({"mode": "sequential", "max_ram_per_worker": 2000})
    assert checked["max_ram_per_worker"] == 2000
    with Orchestrator({"mode": "sequential"}, str(tmp_path)) as orch:
        conf = orch.get_conf()
        assert conf["max_ram_per_worker"] == 2000  # present, as CARS's get_conf has it
        assert orch.cluster.checked_conf_cluster["max_ram_per_worker"] == 2000
        assert orch.cluster.data_to_propagate is None
        assert orch.task_timeout == conf["task_timeout"]
    for mode in ("local_dask", "pbs_dask", "slurm_dask"):
        _, checked = validate_conf(
            {
                "mode": mode,
                "use_memory_logger": False,
                "config_name": "cars",
                "walltime": "00:30:00",
                "python": None,
                "nb_workers": 2,
                **({"account": "me"} if mode == "slurm_dask" else {}),
            }
        )
        assert checked["walltime"] == "00:30:00"
    _, checked = validate_conf({"mode": "slurm_dask", "qos": "high", "account": "me"})
    assert checked["qos"] == "high"


def test_unknown_and_wrong_keys_still_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"valid keys are:.*dump_to_disk"):
        validate_conf({"mode": "multiprocessing", "dump_to_disc": True})
    with pytest.raises(ConfigurationError, match="dump_to_disk must be true or false"):
        validate_conf({"mode": "multiprocessing", "dump_to_disk": "yes"})
    # a CARS key of another mode is refused (CARS refuses it too)
    with pytest.raises(ConfigurationError, match="unknown orchestrator conf key"):
        validate_conf({"mode": "sequential", "dump_to_disk": True})
    assert set(CARS_KEYS) >= {"dump_to_disk", "per_job_timeout", "factorize_tasks"}


# -- API members -----------------------------------------------------------------------------------


def cropped_tile(window: dict, saving_info: dict, cropped: bool) -> Any:
    """A tile whose attributes say whether the disparity range was cropped."""
    import xarray as xr

    data = np.ones((window["row_max"] - window["row_min"], window["col_max"] - window["col_min"]))
    ds = xr.Dataset({"v": (("row", "col"), data.astype("float32"))})
    return fill_dataset(
        ds,
        saving_info=saving_info,
        window=window,
        attributes={"cropped_disparity_range": cropped},
        overlaps={"up": 0, "down": 0, "left": 0, "right": 0},
    )


@pytest.mark.parametrize("mode", ["sequential", "multiprocessing"])
def test_breakpoint_returns_whether_a_disparity_range_was_cropped(
    tmp_path: Path, mode: str
) -> None:
    conf = {"mode": mode, "progress": False}
    if mode == "multiprocessing":
        conf["nb_workers"] = 2
    with Orchestrator(conf, str(tmp_path / "out")) as orch:
        for cropped in (False, True):
            cds = CarsDataset("arrays", name=f"disp{cropped}")
            cds.create_grid(64, 64, 32, 32, 0, 0)
            orch.add_to_save_lists(f"disp{cropped}.zarr", "v", cds)
            [info] = orch.get_saving_infos([cds])
            task = orch.cluster.create_task(cropped_tile)
            for row in range(2):
                for col in range(2):
                    window = cds.get_window_as_dict(row, col)
                    flag = cropped and (row, col) == (1, 0)
                    cds[row, col] = task(window, update_saving_infos(info, row, col), flag)
            assert orch.breakpoint() is cropped
            assert orch.products[f"disp{cropped}.zarr"].endswith(f"disp{cropped}.zarr")


def test_get_disparity_range_cropped_and_merge_dicts() -> None:
    tile = cropped_tile(
        {"row_min": 0, "row_max": 2, "col_min": 0, "col_max": 2}, {"cars_ds_key": 0}, True
    )
    assert get_disparity_range_cropped(tile) is True
    assert get_disparity_range_cropped(None) is False
    left = {"a": {"b": 1}, "c": 1}
    assert merge_dicts(left, {"a": {"d": 2}, "c": 3}) is left  # in place, as CARS
    assert left == {"a": {"b": 1, "d": 2}, "c": 3}


def test_future_iterator_yields_results(tmp_path: Path) -> None:
    with Orchestrator(SEQ, str(tmp_path)) as orch:
        task = orch.cluster.create_task(np.add)
        futures = orch.cluster.start_tasks([task(1, 2), task(3, 4)])
        assert sorted(orch.cluster.future_iterator(futures)) == [3, 7]
        failing = orch.cluster.start_tasks([task(1, "x")])
        with pytest.raises(TaskFailedError, match="Original traceback"):
            list(orch.cluster.future_iterator(failing))


def test_index_target_task_and_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Orchestrator(SEQ, str(out), None, True, str(out / "metadata.yaml")) as orch:
        orch.set_target_task(7)
        assert orch.target_task_id == 7
        orch.update_index({"dsm": {"dsm": "dsm.tif"}})
        orch.update_index({"dsm": {"weights": "weights.tif"}})
        assert orch.product_index == {"dsm": {"dsm": "dsm.tif", "weights": "weights.tif"}}
        cds = CarsDataset("arrays", name="named")
        cds.create_grid(10, 10, 10, 10, 0, 0)
        orch.add_to_replace_lists(cds, cars_ds_name="replaced one")
        assert orch.cars_ds_names_info == ["replaced one"]
        assert orch.out_yaml is orch.out_json
        orch.save_index()
        orch.reset_registries()
    assert yaml.safe_load((out / "dsm" / "index.yaml").read_text()) == {
        "dsm": "dsm.tif",
        "weights": "weights.tif",
    }


def test_geotiff_options_checked_at_registration(tmp_path: Path) -> None:
    with Orchestrator(SEQ, str(tmp_path)) as orch:
        cds = CarsDataset("arrays", name="x")
        cds.create_grid(10, 10, 10, 10, 0, 0)
        with pytest.raises(ConfigurationError, match="rio_band_description"):
            orch.add_to_save_lists("x.tif", "v", cds, rio_band_description=["a"])
        with pytest.raises(ConfigurationError, match="band numbers"):
            orch.add_to_save_lists("x.tif", "v", cds, rio_band_description=[(0, "a")])
        with pytest.raises(ConfigurationError, match="nbits"):
            orch.add_to_save_lists("x.tif", "v", cds, nbits=64)
        orch.reset_registries()


def test_geotiff_options_written_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Orchestrator(SEQ, str(out)) as orch:
        cds = CarsDataset("arrays", name="classes")
        cds.create_grid(64, 64, 32, 32, 0, 0)
        orch.add_to_save_lists(
            "classes.tif",
            "v",
            cds,
            dtype="uint8",
            nodata=255,
            rio_band_description=[(1, "class")],
            rio_tags=[(1, "water"), (1, "building")],
            nbits=1,
        )
        [info] = orch.get_saving_infos([cds])
        task = orch.cluster.create_task(cropped_tile)
        for row in range(2):
            for col in range(2):
                cds[row, col] = task(
                    cds.get_window_as_dict(row, col), update_saving_infos(info, row, col), False
                )
        orch.breakpoint()
    with rasterio.open(out / "classes.tif") as src:
        assert src.descriptions == ("class",)
        assert src.tags()["class_name"] == "building"  # CARS's update_tags: the last one wins
        assert src.tags(1, "IMAGE_STRUCTURE").get("NBITS") == "1"
        assert src.profile["tiled"]
        assert (src.read(1) == 1).all()


# -- GeoTIFF outputs: resume and object stores ------------------------------------------------


def kill_run(out: Path, dsm: Path, classif: Path, dsm_dir: str, kill: bool) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    command = [
        sys.executable,
        str(TESTS / "cars13_kill_run.py"),
        str(out),
        str(dsm),
        str(classif),
        dsm_dir,
    ]
    return subprocess.run(
        [*command, *(["--kill"] if kill else [])], env=env, timeout=300
    ).returncode


@pytest.mark.parametrize("in_place", [False, True])
def test_killed_before_its_geotiff_then_rerun_writes_it_without_recomputing(
    tmp_path: Path, in_place: bool
) -> None:
    pytest.importorskip("cars")
    from cars13_support import dsm_inputs

    inputs = dsm_inputs(tmp_path / "in")
    # the uninterrupted result, computed here (one CARS import less than a subprocess)
    from cars.applications.application import Application

    app = Application(
        "dsm_filling",
        cfg={
            "method": "interpolation",
            "fill_classification": ["1"],
            "tile_size": 128,
            "margin": 16,
        },
    )
    reference = tmp_path / "reference"
    with Orchestrator({"mode": "sequential", "progress": False}, str(reference), None) as orch:
        app.run(
            str(inputs["dsm"]),
            str(inputs["classif"]),
            None,
            ["1"],
            str(reference / "dump"),
            None,
            None,
            dsm_dir=str(reference),
            orchestrator=orch,
        )
        orch.breakpoint()
    with rasterio.open(reference / "dsm.tif") as src:
        expected = src.read()
    out = tmp_path / "out"
    target = inputs["dsm"] if in_place else out / "dsm.tif"
    dsm_dir = "-" if in_place else str(out)
    before = rasterio.open(inputs["dsm"]).read()
    assert kill_run(out, inputs["dsm"], inputs["classif"], dsm_dir, True) == -9
    # killed: the Zarr product is complete, the GeoTIFF is not there / not replaced yet
    assert (out / "dsm.zarr").is_dir() if not in_place else (tmp_path / "in" / "dsm.zarr").is_dir()
    if in_place:
        assert np.array_equal(rasterio.open(target).read(), before)
    else:
        assert not target.exists()
    assert kill_run(out, inputs["dsm"], inputs["classif"], dsm_dir, False) == 0
    stats = yaml.safe_load((out / "metadata.yaml").read_text())["zarr_orch"]["stats"]
    assert stats["tiles"] == 0 and stats["resumed"] == 9  # 3 x 3 tiles, none recomputed
    with rasterio.open(target) as src:
        assert np.array_equal(src.read(), expected)


def test_geotiff_outputs_on_s3(
    moto_server: Any, s3_bucket: str, s3_options: dict, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/run"
    conf = {**SEQ, "storage_options": s3_options}
    with Orchestrator(conf, out_dir=url) as orch:
        cars_app.run_pipeline(orch, tile=(128, 128), size=(256, 300))
    local = tmp_path / "local"
    with Orchestrator(SEQ, out_dir=str(local)) as orch:
        cars_app.run_pipeline(orch, tile=(128, 128), size=(256, 300))
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fetched = tmp_path / "fetched.tif"
    fs.get(f"{s3_bucket}/run/stage1.tif", str(fetched))
    with rasterio.open(fetched) as remote, rasterio.open(local / "stage1.tif") as here:
        assert remote.crs == here.crs and remote.transform == here.transform
        assert remote.nodata == here.nodata == -9999
        np.testing.assert_array_equal(remote.read(), here.read())
