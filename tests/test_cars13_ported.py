"""CARS's own orchestrator/cluster and data-structure tests (CNES/cars ``tests/orchestrator/
cluster/test_cluster.py``, ``test_cluster_config.py``, ``tests/data_structure/test_arrays.py``),
ported to zarr_orch where they test behaviour; the input image is synthesised here instead of
CARS's ``phr_paca`` test data. Exceptions are listed in docs/cars_compatibility.md.

Also: zarr_orch's ``run_save_points`` writes the files CARS's writes for the same tile.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import zarr_orch.orchestrator as zocht
from zarr_orch.data import cars_dataset as cds_mod
from zarr_orch.orchestrator import Orchestrator

rasterio = pytest.importorskip("rasterio")


# -- tests/orchestrator/cluster/test_cluster.py ----------------------------------------------------


def step1_mp(data):
    """Step 1 (module level: worker processes import it)."""
    return data + "_step1a", data + "_step1b"


def step2_mp(data1, data2):
    """Step 2."""
    return data1 + "_" + data2


def step3_mp(data):
    """Step 3."""
    return data + "_step3"


def step1_array(data):
    """Two datasets from one value."""
    coords = {"row": [0, 1, 2], "col": [0, 1, 2, 3]}
    one = xr.Dataset({"im": (("row", "col"), 2 * data * np.ones((3, 4)))}, coords=coords)
    two = xr.Dataset({"im": (("row", "col"), -data * np.ones((3, 4)))}, coords=coords)
    return one, two


def step2_array(dataset1, dataset2):
    """Their sum."""
    arr = dataset1["im"].values + dataset2["im"].values
    return xr.Dataset({"im": (("row", "col"), arr)}, coords={"row": [0, 1, 2], "col": [0, 1, 2, 3]})


CONF_SEQUENTIAL = {"mode": "sequential"}
CONF_MP = {"mode": "mp", "dump_to_disk": False, "nb_workers": 2}
CONF_LOCAL_DASK = {"mode": "local_dask"}
CONF_MP_DUMP = {"mode": "mp", "dump_to_disk": True, "factorize_tasks": False, "nb_workers": 2}


@pytest.mark.parametrize("conf", [CONF_SEQUENTIAL, CONF_MP, CONF_LOCAL_DASK])
def test_tasks_pipeline(conf: dict, tmp_path: Path) -> None:
    """CARS's pipeline_step_by_step: chained tasks with nout=2, results from future_iterator."""
    with Orchestrator(conf, str(tmp_path), str(tmp_path / "logs")) as orch:
        cluster = orch.cluster
        data_list = ["bon", "jour"]
        final_delayed = []
        for data in data_list:
            delayed_1a, delayed_1b = cluster.create_task(step1_mp, nout=2)(data)
            delayed_2 = cluster.create_task(step2_mp, nout=1)(delayed_1a, delayed_1b)
            final_delayed.append(cluster.create_task(step3_mp, nout=1)(delayed_2))
        futures = cluster.start_tasks(final_delayed)
        results = list(cluster.future_iterator(futures))
    expected = [f"{d}_step1a_{d}_step1b_step3" for d in data_list]
    assert sorted(results) == sorted(expected)


def test_tasks_pipeline_dump_xarray(tmp_path: Path) -> None:
    with Orchestrator(CONF_MP_DUMP, str(tmp_path), str(tmp_path / "logs")) as orch:
        cluster = orch.cluster
        delayed_1a, delayed_1b = cluster.create_task(step1_array, nout=2)(101)
        delayed_2 = cluster.create_task(step2_array, nout=1)(delayed_1a, delayed_1b)
        [result] = list(cluster.future_iterator(cluster.start_tasks([delayed_2])))
    np.testing.assert_array_equal(result["im"].values, 101 * np.ones((3, 4)))


# -- tests/orchestrator/cluster/test_cluster_config.py ---------------------------------------------

CONF_AUTO = {"mode": "multiprocessing", "nb_workers": "auto"}
CONF_MP_FULL = {
    "mode": "multiprocessing",
    "nb_workers": 2,
    "max_ram_per_worker": 2000,
    "max_tasks_per_worker": 10,
    "dump_to_disk": True,
    "per_job_timeout": 600,
    "factorize_tasks": True,
}
CONF_LOCAL_DASK_FULL = {
    "mode": "local_dask",
    "use_memory_logger": False,
    "nb_workers": 2,
    "max_ram_per_worker": 2000,
    "walltime": "00:59:00",
    "config_name": "unknown",
    "activate_dashboard": False,
    "python": None,
}


@pytest.mark.parametrize(
    "conf",
    [
        {"mode": "sequential", "max_ram_per_worker": 2000},
        CONF_AUTO,
        CONF_MP_FULL,
        CONF_LOCAL_DASK_FULL,
    ],
)
def test_check_full_conf(conf: dict, tmp_path: Path) -> None:
    """CARS builds ``Orchestrator(conf)`` (temporary out_dir) for each full conf."""
    orch = Orchestrator(conf)
    try:
        checked = orch.get_conf()
        for key, value in conf.items():
            if value != "auto":
                assert checked[key] == value, key
        if conf is CONF_AUTO:
            assert isinstance(checked["nb_workers"], int)
    finally:
        orch.cleanup()


# -- tests/data_structure/test_arrays.py -----------------------------------------------------------


def image(path: Path) -> Path:
    """A 2-band uint16 'sensor image' of 130 x 170 pixels (not a multiple of the tiles)."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4000, (2, 130, 170), dtype="uint16")
    profile = {
        "driver": "GTiff",
        "width": 170,
        "height": 130,
        "count": 2,
        "dtype": "uint16",
        "crs": "EPSG:32631",
        "transform": rasterio.transform.from_origin(600000, 4800000, 0.5, 0.5),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def create_cars_dataset_from_path(path: Path, tag: str, tile_size=(40, 40), overlap=(0, 0)):
    """CARS's helper: an arrays CarsDataset whose tiles are read from a GeoTIFF."""
    with rasterio.open(path) as src:
        width, height = src.width, src.height
    array_cars_ds = cds_mod.CarsDataset("arrays")
    array_cars_ds.create_grid(width, height, tile_size[0], tile_size[1], overlap[0], overlap[1])
    array_cars_ds.tiles = []
    for i in range(array_cars_ds.tiling_grid.shape[0]):
        row = []
        for j in range(array_cars_ds.tiling_grid.shape[1]):
            window = cds_mod.window_array_to_dict(
                array_cars_ds.tiling_grid[i, j, :], overlap=array_cars_ds.overlaps[i, j, :]
            )
            overlaps = cds_mod.overlap_array_to_dict(array_cars_ds.overlaps[i, j, :])
            with rasterio.open(path) as src:
                array = src.read(window=cds_mod.generate_rasterio_window(window))
                profile = dict(src.profile)
            dataset = xr.Dataset(
                {tag: (("band", "row", "col"), array)},
                coords={"band": np.arange(array.shape[0])},
            )
            cds_mod.fill_dataset(
                dataset, saving_info=None, window=window, profile=profile, overlaps=overlaps
            )
            row.append(dataset)
        array_cars_ds.tiles.append(row)
    return array_cars_ds


def artificial_manager_save(manager, save_file: Path, tag: str) -> None:
    """CARS's helper: generate_descriptor + run_save of every tile."""
    dsc = manager.generate_descriptor(manager.tiles[0][0], str(save_file), tag, dtype="float32")
    for i in range(manager.tiling_grid.shape[0]):
        for j in range(manager.tiling_grid.shape[1]):
            cds_mod.CarsDataset("arrays").run_save(
                manager.tiles[i][j], str(save_file), tag=tag, descriptor=dsc
            )
    dsc.close()


def assert_same_images(one: Path, two: Path) -> None:
    with rasterio.open(one) as a, rasterio.open(two) as b:
        assert a.profile["width"] == b.profile["width"]
        assert a.profile["height"] == b.profile["height"]
        assert a.count == b.count and a.transform == b.transform and a.crs == b.crs
        np.testing.assert_allclose(a.read(), b.read())


def test_save_tif_and_constructor(tmp_path: Path) -> None:
    in_file = image(tmp_path / "left_image.tif")
    sensor_image = create_cars_dataset_from_path(in_file, "im")
    out = tmp_path / "left_image_recreated.tif"
    artificial_manager_save(sensor_image, out, "im")
    assert_same_images(out, in_file)


def test_save_to_disk_and_load(tmp_path: Path) -> None:
    in_file = image(tmp_path / "left_image.tif")
    sensor_image = create_cars_dataset_from_path(in_file, "im")
    folder = tmp_path / "left_image_object"
    sensor_image.save_cars_dataset(folder)
    loaded = cds_mod.CarsDataset("arrays", load_from_disk=folder)
    previous, new = tmp_path / "previous.tif", tmp_path / "new.tif"
    artificial_manager_save(sensor_image, previous, "im")
    artificial_manager_save(loaded, new, "im")
    assert_same_images(previous, new)
    np.testing.assert_allclose(sensor_image.tiling_grid, loaded.tiling_grid)
    np.testing.assert_allclose(sensor_image.overlaps, loaded.overlaps)
    xr.testing.assert_identical(sensor_image.tiles[0][0], loaded.tiles[0][0])
    tile_file = tmp_path / "tile.bin"
    sensor_image.save_single_tile(sensor_image.tiles[1][2], str(tile_file))
    xr.testing.assert_identical(
        sensor_image.load_single_tile(str(tile_file)), sensor_image.tiles[1][2]
    )


# -- run_save_points: the same files as CARS's -----------------------------------------------------


def points_tile(row: int, col: int, key: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(row * 10 + col)
    frame = pd.DataFrame(
        {
            "x": rng.uniform(0, 10, 50),
            "y": rng.uniform(0, 10, 50),
            "z": rng.uniform(90, 110, 50),
            "global_id": rng.integers(0, 2, 50).astype("float64"),
        }
    )
    cds_mod.fill_dataframe(
        frame,
        saving_info=zocht.update_saving_infos({"cars_ds_key": key}, row=row, col=col),
        attributes={"source_pc_names": ["left_right", "left_other"], "epsg": 32631},
    )
    return frame


@pytest.mark.parametrize("save_by_pair", [False, True])
def test_run_save_points_writes_what_cars_writes(tmp_path: Path, save_by_pair: bool) -> None:
    cars_cds = pytest.importorskip("cars.data_structures.cars_dataset")
    for which, module in (("cars", cars_cds), ("zarr_orch", cds_mod)):
        directory = tmp_path / which
        directory.mkdir()
        for row, col in [(0, 0), (0, 1), (0, 1)]:  # the second (0, 1) is appended
            module.run_save_points(
                points_tile(row, col),
                str(directory / "points.csv"),
                save_by_pair=save_by_pair,
                point_cloud_format="csv",
            )
    cars_files = sorted(p.relative_to(tmp_path / "cars") for p in (tmp_path / "cars").rglob("*"))
    ours = sorted(
        p.relative_to(tmp_path / "zarr_orch") for p in (tmp_path / "zarr_orch").rglob("*")
    )
    assert cars_files == ours and cars_files
    for name in cars_files:
        if name.suffix == ".csv":
            pd.testing.assert_frame_equal(
                pd.read_csv(tmp_path / "cars" / name), pd.read_csv(tmp_path / "zarr_orch" / name)
            )
    assert os.path.getsize(tmp_path / "zarr_orch" / cars_files[0]) > 0
