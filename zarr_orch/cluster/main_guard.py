"""The ``if __name__ == "__main__":`` guard that spawn and forkserver workers need.

Worker processes started by "spawn" or "forkserver" import the main script again; a script
that runs its pipeline at import time then starts another orchestrator in every worker (each
refused by the lease, each worker dying). `check_main_guard` finds that case in the main
process, before any worker starts, from the script's source, and fails once saying what to add.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys

from zarr_orch.errors import ConfigurationError


def _mentions_name(test: ast.expr) -> bool:
    """True for a test that reads ``__name__`` (``__name__ == "__main__"`` and variants)."""
    return any(isinstance(node, ast.Name) and node.id == "__name__" for node in ast.walk(test))


def unguarded_main_line() -> tuple[str, int] | None:
    """(script, line) when the main script is running this call from module-level code that
    no ``if __name__ ...`` block guards; None otherwise (guarded, interactive, ``-c``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not os.path.isfile(path):
        return None
    frame = inspect.currentframe()
    line, code = None, None
    try:
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
                line, code = frame.f_lineno, frame.f_code
                break
            frame = frame.f_back
    finally:
        del frame
    if line is None or code is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        tree = ast.parse(source, filename=path)
        running = compile(tree, path, "exec", dont_inherit=True).co_code == code.co_code
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    if not running:  # the file changed since it started: its lines say nothing certain
        return None
    guards = [
        node for node in ast.walk(tree) if isinstance(node, ast.If) and _mentions_name(node.test)
    ]
    if any(node.lineno <= line <= (node.end_lineno or node.lineno) for node in guards):
        return None
    return path, line


def check_main_guard(mode: str, start_method: str) -> None:
    """Refuse to start `start_method` workers for a main script without the main guard."""
    if start_method == "fork":
        return
    found = unguarded_main_line()
    if found is None:
        return
    path, line = found
    raise ConfigurationError(
        f"mode {mode!r} starts worker processes with {start_method!r}, which import your "
        f"script {path} again; its line {line} runs the pipeline at import time, so every "
        "worker would start another Orchestrator. Run the pipeline only in the main process: "
        "move the code into a function main() and add these two lines at the end of the "
        'script:\n\n    if __name__ == "__main__":\n        main()\n\n'
        "(or indent the pipeline code under the if line; or use mode 'sequential')"
    )
