"""The storage layer on its own: product plans, chunk writes, records, encoding, locations."""

from __future__ import annotations

import math
import pickle

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr

from zarr_orch import fill_dataset
from zarr_orch.errors import ConfigurationError, ProductError, TileError
from zarr_orch.storage.core.handles import forget_handles
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.encoding import (
    cast_tile,
    check_nodata,
    crs_to_wkt,
    gdal_geotransform,
    normalize_dtype,
    xarray_fill_attrs,
)
from zarr_orch.storage.format.product import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ProductPlan,
    TagSpec,
    product_info,
)
from zarr_orch.storage.readers.windows import done_tiles, read_window
from zarr_orch.storage.writers.arrays import write_arrays_tile
from zarr_orch.storage.writers.prepare import prepare_product

H, W, CH, CW = 50, 70, 20, 30  # 3x3 tiles, last row/col smaller


def make_plan(location: Location, tags=None, chunks=(CH, CW)) -> ProductPlan:
    tags = tags or (TagSpec("hgt", "<f4", -9999.0), TagSpec("cls", "|u1", 255, optional=True))
    grid = (math.ceil(H / chunks[0]), math.ceil(W / chunks[1]))
    return ProductPlan(location, "arrays", "test_ds", tuple(tags), chunks, (H, W), grid)


def attributes(plan: ProductPlan) -> dict:
    return {
        "zarr_orch": {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": plan.kind,
            "records": [plan.records],
            "tags": {},
        }
    }


def tile_for(row: int, col: int, overlap: int = 0, bands: int = 0, chunks=(CH, CW)) -> xr.Dataset:
    """Tile (row, col) with `overlap` margins (clipped at the border): value = r*1000 + c."""
    r0, c0 = row * chunks[0], col * chunks[1]
    r1, c1 = min(r0 + chunks[0], H), min(c0 + chunks[1], W)
    ov = {
        "up": min(overlap, r0),
        "down": min(overlap, H - r1),
        "left": min(overlap, c0),
        "right": min(overlap, W - c1),
    }
    rows = np.arange(r0 - ov["up"], r1 + ov["down"])
    cols = np.arange(c0 - ov["left"], c1 + ov["right"])
    values = (rows[:, None] * 1000 + cols[None, :]).astype("float32")
    variables = {"hgt": (("row", "col"), values)}
    if bands:
        variables["cube"] = (("b", "row", "col"), np.stack([values + i for i in range(bands)]))
    ds = xr.Dataset(variables)
    window = {"row_min": r0, "row_max": r1, "col_min": c0, "col_max": c1}
    profile = {"height": H, "width": W, "transform": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)}
    return fill_dataset(
        ds,
        saving_info={"cars_ds_key": 0, "cars_ds_row": row, "cars_ds_col": col},
        window=window,
        overlaps=ov,
        profile=profile,
    )


def expected() -> np.ndarray:
    return (np.arange(H)[:, None] * 1000 + np.arange(W)[None, :]).astype("float32")


@pytest.fixture
def location(tmp_path) -> Location:
    return Location.parse(tmp_path / "prod.zarr")


def write_tile_and_record(plan, tile, row, col, what):
    """What a sink + the main process do: write the tile's chunks, then its record."""
    result = write_arrays_tile(plan, tile, row, col, what)
    writer = rec.RecordWriter()
    writer.submit(plan.location, row, col, result.record)
    writer.close()
    return result


# -- ProductPlan / prepare_product -------------------------------------------------------------


def test_plan_records_name_is_stable_and_picklable(location):
    plan = make_plan(location)
    assert plan.tag_names == ("hgt", "cls")
    assert plan.records == rec.records_name(["cls", "hgt"])  # order does not matter
    assert plan.records != rec.records_name(["hgt"])
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_prepare_product_creates_group_and_records(location):
    plan = make_plan(location)
    assert product_info(location) is None
    assert prepare_product(plan, attributes(plan)) == set()
    info = product_info(location)
    assert info["format"] == FORMAT_NAME and info["kind"] == "arrays"
    records = rec.open_records(location.zarr_store(), plan.records)
    assert records.shape == (3, 3, len(rec.BASE_FIELDS) + 2)
    assert records.attrs["tags"] == ["hgt", "cls"]
    # preparing again is idempotent and returns the tiles done so far
    write_tile_and_record(plan, tile_for(1, 2), 1, 2, "tile (1, 2)")
    assert prepare_product(plan, attributes(plan)) == {(1, 2)}


def test_write_arrays_tile_writes_exactly_one_chunk_per_tag(location):
    plan = make_plan(location)
    prepare_product(plan, attributes(plan))
    for row in range(3):
        for col in range(3):
            result = write_tile_and_record(plan, tile_for(row, col, overlap=3), row, col, "t")
            assert result.tags == ("hgt",) and result.missing == ("cls",)
            assert result.nbytes == 4 * min(CH, H - row * CH) * min(CW, W - col * CW)
            assert set(result.crcs) == {"hgt"}
    array = zarr.open_group(location.url, mode="r")["hgt"]
    assert array.chunks == (CH, CW) and array.shape == (H, W)
    assert array.nchunks_initialized == 9
    np.testing.assert_array_equal(array[...], expected())
    assert done_tiles(location, plan.records) == {(r, c) for r in range(3) for c in range(3)}
    # read_window: the core window of a tile
    np.testing.assert_array_equal(
        read_window(location, "hgt", {"row_min": 40, "row_max": 50, "col_min": 60, "col_max": 70}),
        expected()[40:, 60:],
    )


def test_three_dimensional_tag_and_read_window(location):
    plan = make_plan(location, tags=(TagSpec("cube", "<f4", -1.0),))
    prepare_product(plan, attributes(plan))
    write_tile_and_record(plan, tile_for(2, 1, overlap=2, bands=2), 2, 1, "t")
    array = zarr.open_group(location.url, mode="r")["cube"]
    assert array.shape == (2, H, W) and array.chunks == (2, CH, CW)
    # georeferenced tiles (tile_for gives a transform) are stored with y/x dims (format 2)
    assert array.metadata.dimension_names == ("band", "y", "x")
    window = {"row_min": 40, "row_max": 50, "col_min": 30, "col_max": 60}
    got = read_window(location, "cube", window)
    np.testing.assert_array_equal(got[0], expected()[40:, 30:60])
    np.testing.assert_array_equal(got[1], expected()[40:, 30:60] + 1)
    assert (array[:, :40, :] == -1).all()


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ({"row_min": 40, "row_max": 60, "col_min": 0, "col_max": 30}, "outside the 50x70"),
        ({"row_min": 10, "row_max": 30, "col_min": 0, "col_max": 30}, "not exactly one 20x30"),
        ({"row_min": 0, "row_max": 20}, "no valid attrs['window']"),
    ],
)
def test_window_that_is_not_one_chunk_is_refused(location, window, message):
    plan = make_plan(location)
    prepare_product(plan, attributes(plan))
    tile = tile_for(0, 0)
    tile.attrs["window"] = window
    with pytest.raises(TileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_tile_and_record(plan, tile, 0, 0, "tile (row=0, col=0) of test_ds")
    assert done_tiles(location, plan.records) == set()


def test_tile_shape_disagreeing_with_window_is_refused(location):
    plan = make_plan(location)
    prepare_product(plan, attributes(plan))
    tile = tile_for(0, 0).isel(col=slice(0, 29))
    with pytest.raises(TileError, match=r"tile \(row=0, col=0\).*disagrees with its window"):
        write_tile_and_record(plan, tile, 0, 0, "tile (row=0, col=0)")


def test_existing_product_with_other_tile_size_is_refused_and_intact(location):
    plan = make_plan(location)
    prepare_product(plan, attributes(plan))
    write_tile_and_record(plan, tile_for(0, 0), 0, 0, "t")
    before = zarr.open_group(location.url, mode="r")["hgt"][...]
    other = make_plan(location, chunks=(25, 35))
    with pytest.raises(ProductError, match=r"chunks \(20, 30\) != tile size \(25, 35\)"):
        prepare_product(other, attributes(other))
    forget_handles()
    np.testing.assert_array_equal(zarr.open_group(location.url, mode="r")["hgt"][...], before)
    assert done_tiles(location, plan.records) == {(0, 0)}


def test_foreign_zarr_group_and_non_zarr_data_are_refused(tmp_path):
    foreign = Location.parse(tmp_path / "foreign.zarr")
    group = zarr.open_group(foreign.url, mode="w", zarr_format=3)
    group.create_array("data", shape=(4,), dtype="i4")[...] = 7
    plan = make_plan(foreign)
    with pytest.raises(ProductError, match="zarr_orch did not write"):
        prepare_product(plan, attributes(plan))
    assert list(zarr.open_group(foreign.url, mode="r")["data"][...]) == [7] * 4
    garbage = tmp_path / "garbage.zarr"
    garbage.mkdir()
    (garbage / "zarr.json").write_text("{not json")
    with pytest.raises(ProductError, match="not a Zarr v3 group"):
        product_info(Location.parse(garbage))


def test_newer_format_version_is_refused(location):
    plan = make_plan(location)
    attrs = attributes(plan)
    attrs["zarr_orch"]["format_version"] = 99
    prepare_product(plan, attrs)
    with pytest.raises(ProductError, match="newer zarr_orch"):
        product_info(location)


# -- records -----------------------------------------------------------------------------------


def test_records_record_and_forget_tiles(tmp_path):
    group = zarr.open_group(str(tmp_path / "r.zarr"), mode="w", zarr_format=3)
    records = rec.create_records(group, "tiles_x", (2, 3), ["a", "b"])
    assert rec.create_records(group, "tiles_x", (2, 3), ["a", "b"]).shape == records.shape
    with pytest.raises(ProductError, match="another tile grid"):
        rec.create_records(group, "tiles_x", (3, 3), ["a", "b"])
    data = np.arange(6, dtype="float32")
    store = group.store
    location = Location.parse(str(tmp_path / "r.zarr"))
    writer = rec.RecordWriter(floor=3600)
    writer.submit(
        location, 1, 2, ("tiles_x", rec.record_bytes(data.nbytes, [rec.checksum(data), 5]))
    )
    writer.submit(location, 0, 0, ("tiles_x", rec.record_bytes(0, [0, 0])))
    assert rec.done_tiles(store, "tiles_x") == set()  # not written before the flush
    assert writer.flush() == []
    assert rec.done_tiles(store, "tiles_x") == {(1, 2), (0, 0)}
    stored = rec.open_records(store, "tiles_x")[1, 2, :]
    assert stored[0] == 1 and stored[2] == 24 and stored[3] == rec.checksum(data)
    rec.forget_tiles(rec.open_records(store, "tiles_x", mode="r+"), [(1, 2)])
    assert rec.done_tiles(store, "tiles_x") == {(0, 0)}
    # a later record in the same block keeps the block's other records (no lost update)
    writer.submit(location, 1, 1, ("tiles_x", rec.record_bytes(0, [0, 0])))
    writer.close()
    assert rec.done_tiles(store, "tiles_x") == {(0, 0), (1, 1)}
    assert rec.open_records(store, "tiles_x").chunks == (2, 3, 5)


# -- encoding ----------------------------------------------------------------------------------


def test_cast_tile_rules():
    ints = cast_tile(np.array([[1.4, 2.5, np.nan, -2.5]]), np.dtype("int16"), -32768, "t")
    assert ints.tolist() == [[1, 2, -32768, -2]]  # rint: round half to even
    floats = cast_tile(np.array([[1.0, np.nan]], dtype="float32"), np.dtype("float32"), -9999, "t")
    assert floats.tolist() == [[1.0, -9999.0]]
    nan_kept = cast_tile(np.array([[np.nan]]), np.dtype("float32"), np.nan, "t")
    assert np.isnan(nan_kept).all() and nan_kept.dtype == np.float32
    assert cast_tile(np.array([[1, 2]], dtype="int64"), np.dtype("uint8"), 0, "t").dtype == np.uint8


@pytest.mark.parametrize(
    ("values", "dtype", "nodata", "message"),
    [
        (np.array([[np.inf]]), "int16", 0, "inf values"),
        (np.array([[np.nan]]), "int16", None, "NaN values.*without a nodata"),
        (np.array([[300.0]]), "uint8", 0, r"outside the range of uint8"),
        (np.array([[-1]]), "uint16", 0, r"outside the range of uint16"),
        (np.array([[1 + 1j]]), "float32", 0, "complex"),
        (np.array([["a"]]), "float32", 0, "<U1"),
    ],
)
def test_cast_tile_refuses_what_the_dtype_cannot_hold(values, dtype, nodata, message):
    with pytest.raises(TileError, match=f"tile X.*{message}"):
        cast_tile(values, np.dtype(dtype), nodata, "tile X")


def test_cast_tile_uint8_exact():
    got = cast_tile(np.array([[1.4, 2.5, np.nan, 254.6]]), np.dtype("uint8"), 0, "t")
    assert got.tolist() == [[1, 2, 0, 255]]


def test_check_nodata_and_normalize_dtype():
    assert check_nodata(np.dtype("uint8"), 255) == 255
    assert type(check_nodata(np.dtype("int16"), -9999.0)) is int
    assert check_nodata(np.dtype("float32"), -9999) == -9999.0
    assert math.isnan(check_nodata(np.dtype("float32"), float("nan")))
    assert check_nodata(np.dtype("float32"), None) is None
    assert check_nodata(np.dtype("bool"), 0) is False
    with pytest.raises(ConfigurationError, match=r"-9999.*uint8.*range 0..255"):
        check_nodata(np.dtype("uint8"), -9999)
    with pytest.raises(ConfigurationError, match="integer dtypes need an integer nodata"):
        check_nodata(np.dtype("int16"), float("nan"))
    with pytest.raises(ConfigurationError, match="integer dtypes need an integer nodata"):
        check_nodata(np.dtype("int32"), 1.5)
    with pytest.raises(ConfigurationError, match="does not fit dtype float16"):
        check_nodata(np.dtype("float16"), 1e10)
    with pytest.raises(ConfigurationError, match="must be a number"):
        check_nodata(np.dtype("float32"), "nan please")
    with pytest.raises(ConfigurationError, match="must be a number"):
        check_nodata(np.dtype("int8"), True)
    assert normalize_dtype("float32") == np.float32
    for bad in ("complex64", "object", "U4", "datetime64[ns]"):
        with pytest.raises(ConfigurationError, match="cannot be saved to a raster product"):
            normalize_dtype(bad)
    with pytest.raises(ConfigurationError, match="not a numpy dtype"):
        normalize_dtype("not_a_dtype")


def test_xarray_fill_attrs_match_what_xarray_writes():
    attrs, fill = xarray_fill_attrs("<f4", -9999.0, 2)
    assert fill == -9999.0 and "_FillValue" in attrs
    attrs, fill = xarray_fill_attrs("|u1", 255, 3)
    assert attrs == {"_FillValue": 255} and fill == 255
    attrs, fill = xarray_fill_attrs("<f4", None, 2)
    assert "_FillValue" not in attrs and math.isnan(fill)
    # round trip: xarray decodes the attribute back to the nodata value
    store = zarr.storage.MemoryStore()
    group = zarr.open_group(store, mode="w", zarr_format=3)
    attrs, fill = xarray_fill_attrs("<f4", -9999.0, 2)
    group.create_array(
        "v",
        shape=(2, 2),
        dtype="<f4",
        fill_value=fill,
        attributes=attrs,
        dimension_names=["row", "col"],
    )
    ds = xr.open_zarr(store, consolidated=False)
    assert ds["v"].encoding["_FillValue"] == -9999.0
    assert ds["v"].isnull().all()


def test_georeferencing_helpers():
    wkt, text = crs_to_wkt(32631)
    assert "UTM zone 31N" in wkt and text == "EPSG:32631"
    assert crs_to_wkt(None) == (None, None)
    with pytest.raises(TileError, match="not a valid CRS"):
        crs_to_wkt("EPSG:not-a-code")
    assert gdal_geotransform((0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0)) == (
        "600000.0 0.5 0.0 4800000.0 0.0 -0.5"
    )


# -- Location ----------------------------------------------------------------------------------


def test_location_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.parse("rel/x.zarr").url == str(tmp_path / "rel" / "x.zarr")
    assert Location.parse(f"file://{tmp_path}/a").url == str(tmp_path / "a")
    assert Location.parse(f"file://{tmp_path}/a").is_local
    base = Location.parse(tmp_path / "out")
    assert Location.parse("sub/p.zarr", base=base).url == str(tmp_path / "out" / "sub" / "p.zarr")
    assert Location.parse("/abs/p.zarr", base=base).url == "/abs/p.zarr"
    mem = Location.parse("memory://bucket/dir/")
    assert mem.url == "memory://bucket/dir" and mem.protocol == "memory"
    assert not mem.is_local
    assert mem.join("a", "b/c").url == "memory://bucket/dir/a/b/c"
    assert mem.name == "dir" and mem.parent.url == "memory://bucket"
    assert pickle.loads(pickle.dumps(mem)) == mem


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty path"),
        ("nosuchproto://x/y", "unsupported URL protocol 'nosuchproto'"),
        ("memory://", "names no bucket or path"),
        ("simplecache::s3://b/k", "chained fsspec URLs"),
    ],
)
def test_location_bad_urls(text, message):
    with pytest.raises(ConfigurationError, match=message):
        Location.parse(text)


@pytest.mark.parametrize("part", ["../x.zarr", "a/../../x", "a/zarr.json", "/etc", "C:/x"])
def test_location_join_refuses_traversal(tmp_path, part):
    with pytest.raises(ConfigurationError):
        Location.parse(tmp_path).join(part)


def test_location_repr_masks_secrets():
    options = {
        "key": "AKIAEXAMPLE",
        "secret": "very-secret",
        "token": "tok",
        "client_kwargs": {"endpoint_url": "http://localhost:9000", "region": "eu"},
    }
    loc = Location("s3://bucket/prefix", options)
    text = repr(loc)
    for secret in ("AKIAEXAMPLE", "very-secret", "tok'"):
        assert secret not in text
    assert "http://localhost:9000" in text and "***" in text
    assert str(loc) == "s3://bucket/prefix"
    assert loc.storage_options["secret"] == "very-secret"  # only the repr is masked


def test_product_on_memory_filesystem():
    location = Location.parse("memory://zarr-orch-tests/prod.zarr")
    location.rm()
    plan = make_plan(location)
    prepare_product(plan, attributes(plan))
    for row in range(3):
        for col in range(3):
            write_tile_and_record(plan, tile_for(row, col, overlap=1), row, col, "t")
    assert done_tiles(location, plan.records) == {(r, c) for r in range(3) for c in range(3)}
    np.testing.assert_array_equal(
        read_window(location, "hgt", {"row_min": 20, "row_max": 40, "col_min": 30, "col_max": 60}),
        expected()[20:40, 30:60],
    )
    assert fsspec.filesystem("memory").exists("/zarr-orch-tests/prod.zarr/hgt/zarr.json")
    location.rm()
    assert not location.exists()
