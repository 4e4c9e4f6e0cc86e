"""Local atomic writes (a temp file beside the target, then a rename) and the temp files a
killed writer leaves behind: their names, in one place, and the sweep that removes them.

Every local file zarr_orch writes goes through `atomic_write`: `temp_path` names the temp
file, so a reader sees the old file or the new one, never a torn one. zarr's own
``LocalStore`` (group and array documents, chunks written through zarr) does the same with
names of its own. A process SIGKILLed between the open and the rename leaves its temp file
for good: no key names it, so nothing reads it, but it litters the product (``ls``, GDAL,
QGIS, key listings) and holds disk space. `find_temp_files` lists exactly these two name
patterns (`is_temp_name`), nothing else; `sweep_temp_files` deletes them. Deleting the temp
file of a writer still alive is never damage: its rename then fails, the target is left as
it was. Object stores write with one PUT and leave nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable

logger = logging.getLogger(__name__)

#: the last part of every temp file name (zarr_orch's and zarr's)
TEMP_SUFFIX = ".partial"

#: `temp_path`'s names: ``<target>.<pid>.<thread id>.partial`` (two writers of one target,
#: in two processes or two threads, never share a temp file)
OWN_TEMP = re.compile(r"^.+\.[0-9]+\.[0-9]+\.partial$")

#: zarr's ``LocalStore`` (``_atomic_write``, zarr >= 3.1): ``<target>`` with its last
#: suffix replaced by ``.<uuid4 hex>.partial`` (``zarr.json`` -> ``zarr.<hex>.partial``,
#: chunk ``c/0/1`` -> ``c/0/1.<hex>.partial``)
ZARR_TEMP = re.compile(r"^.+\.[0-9a-f]{32}\.partial$")

#: verify removes a temp file only when it is at least this old (seconds): one writing now
#: is seconds old at most, and verify of a lone product holds no lease
STALE_AFTER = 60.0


def temp_path(path: str) -> str:
    """The temp file this process and thread write `path` through (see `OWN_TEMP`)."""
    return f"{path}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """True when the last component of `name` is a temp file name zarr_orch or zarr writes."""
    base = os.path.basename(name)
    return base.endswith(TEMP_SUFFIX) and bool(OWN_TEMP.match(base) or ZARR_TEMP.match(base))


def atomic_write(path: str, *parts: bytes | memoryview) -> None:
    """Write `parts` to a local file atomically: a temp file beside it, then a rename.

    A reader (or a rerun after a crash) sees the old file or the new one, never a torn
    one; the temp file is removed when the write fails (e.g. disk full). Missing parent
    directories are created.
    """
    tmp = temp_path(path)
    try:
        handle = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(tmp, "wb")  # noqa: SIM115
    try:
        with handle:
            for part in parts:
                handle.write(part)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def find_temp_files(root: str) -> list[str]:
    """Paths of the temp files (`is_temp_name`) anywhere under the directory `root`, sorted.

    One ``os.scandir`` pass over the tree; symbolic links are not followed, only regular
    files are listed (nor is a directory named ``*.partial`` entered: none of ours is). A
    missing `root` has none; an unreadable directory is skipped.
    """
    found: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    name = entry.name
                    if name.endswith(TEMP_SUFFIX):  # cheap test first: 100k chunks per product
                        if (OWN_TEMP.match(name) or ZARR_TEMP.match(name)) and entry.is_file(
                            follow_symlinks=False
                        ):
                            found.append(entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # housekeeping: never the reason a run or a check fails
            logger.warning("not looking for temp files in %s: %s", directory, exc)
    return sorted(found)


def remove_temp_files(paths: Iterable[str], min_age: float = 0.0) -> tuple[list[str], list[str]]:
    """Delete the temp files `paths` (`is_temp_name` checked again); (removed, kept).

    A file modified less than `min_age` seconds ago is kept. Files already gone are
    neither (their writer renamed them, or another sweep got there first).
    """
    removed: list[str] = []
    kept: list[str] = []
    now = time.time()
    for path in paths:
        if not is_temp_name(path):
            raise ValueError(f"{path} is not a temp file name; refusing to delete it")
        try:
            if min_age > 0 and now - os.stat(path, follow_symlinks=False).st_mtime < min_age:
                kept.append(path)
                continue
            os.remove(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove the temp file %s: %s", path, exc)
            kept.append(path)
            continue
        removed.append(path)
    return removed, kept


def sweep_temp_files(root: str) -> list[str]:
    """Delete every temp file under `root`; returns their paths.

    Only for a directory no live writer uses: the caller holds the out_dir lease and has
    not started this run's writers on it (`zarr_orch.storage.writers.prepare`).
    """
    removed, _kept = remove_temp_files(find_temp_files(root))
    if removed:
        logger.info(
            "%s: removed %d temp file(s) left by a killed writer (e.g. %s)",
            root,
            len(removed),
            os.path.relpath(removed[0], root),
        )
    return removed
