"""A writer for the tests to SIGKILL mid-write: rewrites one file with its own bytes, forever.

Usage: python tests/killed_writer.py own|zarr ROOT KEY
``own`` writes ``ROOT/KEY`` through zarr_orch's `atomic_write` (as a worker writes a chunk
and the main process a records block); ``zarr`` through zarr's LocalStore (as zarr writes
``zarr.json`` documents; 8 writes at once). The bytes written are the file's own, so a
write that completes leaves the product unchanged. Prints ``writing <pid> <thread id>``
once the first write has completed; from then on most of its time is spent between a temp
file's creation and its rename, where a kill leaves the temp file behind.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from zarr_orch.storage.core.atomic_files import atomic_write


def main(how: str, root: str, key: str) -> None:
    path = os.path.join(root, *key.split("/"))
    with open(path, "rb") as handle:
        data = handle.read()
    if how == "own":

        def write() -> None:
            atomic_write(path, data)

    else:  # zarr's writes hop to its event loop: several at once keep temp files around
        store = zarr.storage.LocalStore(root)
        buffer = default_buffer_prototype().buffer.from_bytes(data)

        async def several() -> None:
            await asyncio.gather(*(store.set(key, buffer) for _ in range(8)))

        def write() -> None:
            sync(several())

    write()
    print(f"writing {os.getpid()} {threading.get_ident()}", flush=True)
    while True:
        write()


if __name__ == "__main__":
    main(*sys.argv[1:4])
