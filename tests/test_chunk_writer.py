"""The direct chunk writer stores exactly the bytes zarr's own ``array[...] = tile`` stores.

Every chunk of an array written tile by tile through zarr is compared, file by file, with
the same array written through `ChunkWriter`: codecs none/zstd/zstd-1 with and without the
checksum, several dtypes and fill values (NaN included), 2-D and 3-D arrays, edge chunks
(padded) and all-fill chunks (not stored). Runs on every zarr version CI installs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format.product import compressors_for
from zarr_orch.storage.writers.chunk_writer import ChunkWriter, atomic_write


def chunk_files(root: Path) -> dict[str, bytes]:
    """Every chunk file under an array directory, by relative path."""
    base = root / "c"
    if not base.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def tiles_of(shape: tuple[int, ...], chunks: tuple[int, int], fill, dtype, seed: int):
    """(chunk coords, slices, values) for every chunk; some chunks are all fill value."""
    rng = np.random.default_rng(seed)
    height, width = shape[-2:]
    ch, cw = chunks
    for i, r0 in enumerate(range(0, height, ch)):
        for j, c0 in enumerate(range(0, width, cw)):
            r1, c1 = min(r0 + ch, height), min(c0 + cw, width)
            box = (*shape[:-2], r1 - r0, c1 - c0)
            if (i + j) % 3 == 2:
                values = np.full(box, fill, dtype=dtype)
            elif np.dtype(dtype).kind == "f":
                values = rng.normal(100, 30, box).round(1).astype(dtype)
                values[..., 0, 0] = fill  # a nodata pixel inside a stored chunk
            else:
                info = np.iinfo(dtype)
                values = rng.integers(info.min, info.max, box, dtype=dtype, endpoint=True)
            coords = (i, j) if len(shape) == 2 else (0, i, j)
            index = (slice(r0, r1), slice(c0, c1))
            yield coords, (index if len(shape) == 2 else (slice(None), *index)), values


CASES = [
    ("float32", float("nan"), "zstd", True, (37, 50)),
    ("float32", -9999.0, "zstd", False, (37, 50)),
    ("float32", 0.0, "none", True, (32, 48)),
    ("float32", 0.0, "none", False, (33, 47)),
    ("float64", float("nan"), "zstd-1", True, (20, 31)),
    ("uint8", 0, "zstd", True, (37, 50)),
    ("uint8", 255, "none", True, (17, 9)),
    ("int16", -32768, "zstd", True, (40, 40)),
    ("uint16", 0, "zstd", True, (3, 37, 50)),
    ("float32", float("nan"), "none", True, (2, 30, 41)),
]


@pytest.mark.parametrize(("dtype", "fill", "codec", "checksum", "shape"), CASES)
def test_chunks_are_byte_identical_to_zarr(tmp_path, dtype, fill, codec, checksum, shape):
    chunks2d = (16, 16)
    chunks = chunks2d if len(shape) == 2 else (shape[0], *chunks2d)

    def create(name: str):
        return zarr.create_array(
            str(tmp_path / name),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill,
            compressors=compressors_for(codec, checksum),
        )

    by_zarr, direct = create("zarr"), create("direct")
    writer = ChunkWriter.for_array(Location.parse(str(tmp_path)), "direct", direct)
    assert writer is not None, "this chain must take the direct path"
    for coords, index, values in tiles_of(shape, chunks2d, fill, dtype, seed=len(shape)):
        by_zarr[index] = values
        writer.write(coords, values)
    expected = chunk_files(tmp_path / "zarr")
    assert expected, "the test must store some chunks"
    assert chunk_files(tmp_path / "direct") == expected
    np.testing.assert_array_equal(direct[...], by_zarr[...])
    assert not list(tmp_path.rglob("*.partial"))


def test_an_all_fill_tile_removes_the_chunk_a_previous_run_stored(tmp_path):
    array = zarr.create_array(
        str(tmp_path / "a"), shape=(8, 8), chunks=(4, 4), dtype="float32", fill_value=np.nan
    )
    writer = ChunkWriter.for_array(Location.parse(str(tmp_path)), "a", array)
    writer.write((0, 0), np.ones((4, 4), "float32"))
    assert (tmp_path / "a" / "c" / "0" / "0").exists()
    writer.write((0, 0), np.full((4, 4), np.nan, "float32"))
    assert not (tmp_path / "a" / "c" / "0" / "0").exists()
    assert np.isnan(array[...]).all()


def test_chains_it_does_not_reproduce_fall_back_to_zarr(tmp_path):
    blosc = zarr.create_array(
        str(tmp_path / "b"),
        shape=(8, 8),
        chunks=(4, 4),
        dtype="float32",
        compressors=compressors_for("blosc-lz4", True),
    )
    assert ChunkWriter.for_array(Location.parse(str(tmp_path)), "b", blosc) is None
    fortran = zarr.create_array(
        str(tmp_path / "f"), shape=(8, 8), chunks=(4, 4), dtype="float32", config={"order": "F"}
    )
    assert ChunkWriter.for_array(Location.parse(str(tmp_path)), "f", fortran) is None


def test_a_wrong_dtype_is_refused_before_anything_is_written(tmp_path):
    array = zarr.create_array(str(tmp_path / "a"), shape=(8, 8), chunks=(4, 4), dtype="int16")
    writer = ChunkWriter.for_array(Location.parse(str(tmp_path)), "a", array)
    with pytest.raises(TypeError, match="does not fit"):
        writer.write((0, 0), np.ones((4, 4), "float32"))
    assert not (tmp_path / "a" / "c").exists()


def test_object_stores_get_one_put_per_chunk():
    location = Location.parse("memory://chunk-writer-test/p.zarr")
    group = zarr.open_group(location.zarr_store(), mode="w")
    array = group.create_array("t", shape=(8, 8), chunks=(4, 4), dtype="float32")
    writer = ChunkWriter.for_array(location, "t", array)
    assert writer is not None
    values = np.arange(16, dtype="float32").reshape(4, 4)
    writer.write((1, 0), values)
    np.testing.assert_array_equal(array[4:8, 0:4], values)


def test_atomic_write_leaves_no_partial_file_when_the_write_fails(tmp_path):
    target = tmp_path / "sub" / "x"
    atomic_write(str(target), b"old")
    with pytest.raises(TypeError):
        atomic_write(str(target), b"new", object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["x"]
