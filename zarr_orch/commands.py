"""How to run zarr-orch and Python here: the commands printed hints show, spelled so that
they work when copied (also without an activated virtual environment).

A leaf module (standard library only), so every layer may use it for its messages.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

ENTRY_POINT = "zarr-orch"


def _same_file(left: str, right: str) -> bool:
    try:
        return os.path.samefile(left, right)
    except OSError:
        return False


def python_command() -> str:
    """This interpreter: ``python`` (or ``python3``, or its own name such as
    ``python3.11``) when that name on PATH is this very interpreter (not merely the same
    binary of another environment), else its full path."""
    for name in dict.fromkeys(("python", "python3", os.path.basename(sys.executable))):
        found = shutil.which(name)
        if found and os.path.abspath(found) == os.path.abspath(sys.executable):
            return name
    return shlex.quote(sys.executable)


def cli_command() -> str:
    """The zarr-orch command of this environment.

    The entry point that runs this process (or, from a script, the one installed beside
    this interpreter): bare ``zarr-orch`` when that is what PATH finds, else its full path;
    ``python -m zarr_orch`` when no entry point is installed or the process runs that way.
    """
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if (
        os.path.basename(argv0) in ("__main__.py", "cli.py")
        and os.path.basename(os.path.dirname(argv0)) == "zarr_orch"
    ):
        return f"{python_command()} -m zarr_orch"
    if os.path.basename(argv0) == ENTRY_POINT and os.path.isfile(argv0):
        script = argv0
    else:
        script = os.path.join(os.path.dirname(sys.executable), ENTRY_POINT)
        if not os.path.isfile(script):
            return f"{python_command()} -m zarr_orch"
    on_path = shutil.which(ENTRY_POINT)
    if on_path and _same_file(on_path, script):
        return ENTRY_POINT
    return shlex.quote(script)


def shell_join(*words: str) -> str:
    """Words quoted for a POSIX shell (an URL or path with spaces stays one argument)."""
    return " ".join(shlex.quote(word) for word in words)
