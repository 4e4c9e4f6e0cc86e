"""What `verify` reports: the kinds of problem, one bad tile, and the report of a check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zarr_orch.commands import cli_command, shell_join
from zarr_orch.storage.core.atomic_files import STALE_AFTER

MISMATCH = "mismatch"


MISSING_CHUNK = "missing chunk"


UNDECODABLE = "undecodable"


MISSING_ARRAY = "missing array"


MISSING_GROUP = "missing tile group"


MALFORMED = "malformed record"


#: a windowed product whose last merge was cut by a crash (the next run rolls it back)
UNFINISHED_MERGE = "unfinished merge"


UNREADABLE = "unreadable product"


#: every problem kind, as the first words of `BadTile.problem`
PROBLEM_KINDS = (
    MISMATCH,
    MISSING_CHUNK,
    UNDECODABLE,
    MISSING_ARRAY,
    MISSING_GROUP,
    MALFORMED,
    UNREADABLE,
    UNFINISHED_MERGE,
)


class BadTile(NamedTuple):
    """One problem: the product URL, the tile (None for product-level problems), the tag
    ("" when the problem is not about one tag) and the problem, starting with its kind."""

    product: str
    row: int | None
    col: int | None
    tag: str
    problem: str

    @property
    def kind(self) -> str:
        """The problem kind (one of `PROBLEM_KINDS`)."""
        return self.problem.split(":", 1)[0]


@dataclass
class VerifyReport:
    """What a verification found: products checked, records checked, bad tiles, repairs."""

    products: list[str] = field(default_factory=list)
    checked: int = 0
    bad: list[BadTile] = field(default_factory=list)
    repaired: list[tuple[str, int, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: what was verified (a run directory or one product): the hint names it
    target: str = ""
    #: temp files killed writers left in local products (litter, not damage)
    temp_files: list[str] = field(default_factory=list)
    #: those repair deleted, and those it kept (written less than `STALE_AFTER` s ago)
    removed_temp_files: list[str] = field(default_factory=list)
    kept_temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.bad

    def extend(self, other: VerifyReport) -> None:
        """Add another report's findings to this one (a run = its products)."""
        self.products += other.products
        self.checked += other.checked
        self.bad += other.bad
        self.repaired += other.repaired
        self.skipped += other.skipped
        self.temp_files += other.temp_files
        self.removed_temp_files += other.removed_temp_files
        self.kept_temp_files += other.kept_temp_files

    def __str__(self) -> str:
        lines = [
            f"verified {self.checked} tile record(s) in {len(self.products)} product(s) in "
            f"{self.seconds:.1f} s: " + ("all good" if self.ok else f"{len(self.bad)} problem(s)")
        ]
        for bad in self.bad:
            where = "product" if bad.row is None else f"tile (row={bad.row}, col={bad.col})"
            tag = f" tag {bad.tag!r}" if bad.tag else ""
            lines.append(f"  {bad.product} {where}{tag}: {bad.problem}")
        for url, why in self.skipped:
            lines.append(f"  skipped {url}: {why}")
        lines += self._temp_lines()
        if self.repaired:
            lines.append(
                f"repaired: forgot the records of {len(self.repaired)} tile(s); rerun the "
                "pipeline (resume on) to recompute exactly those tiles"
            )
        elif not self.ok:
            lines.append(
                f"run again with repair ({self._repair_command()}) to forget the records "
                "of these tiles, then rerun the pipeline to recompute them"
            )
        return "\n".join(lines)

    def _repair_command(self) -> str:
        command = f"{cli_command()} verify --repair"
        return f"{command} {shell_join(self.target)}" if self.target else command

    def _temp_lines(self) -> list[str]:
        """What the report says about temp files (a few named, the rest counted)."""
        if self.removed_temp_files or self.kept_temp_files:  # repair ran
            lines = []
            if self.removed_temp_files:
                lines.append(
                    f"removed {len(self.removed_temp_files)} temp file(s) left by killed writers"
                )
            if self.kept_temp_files:
                lines.append(
                    f"kept {len(self.kept_temp_files)} temp file(s) written less than "
                    f"{STALE_AFTER:.0f} s ago: a live writer may own them"
                )
            return lines
        if not self.temp_files:
            return []
        lines = [
            f"{len(self.temp_files)} temp file(s) left by killed writers (not damage, nothing "
            f"reads them); {self._repair_command()} removes them, and so does the next run of "
            "the pipeline for the products inside its out_dir:"
        ]
        lines += [f"  {path}" for path in self.temp_files[:5]]
        if len(self.temp_files) > 5:
            lines.append(f"  ... and {len(self.temp_files) - 5} more")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (for ``zarr-orch verify --json`` and scripts)."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "products": list(self.products),
            "bad": [dict(b._asdict(), kind=b.kind) for b in self.bad],
            "repaired": [{"product": p, "row": r, "col": c} for p, r, c in self.repaired],
            "skipped": [{"product": p, "reason": why} for p, why in self.skipped],
            "temp_files": list(self.temp_files),
            "removed_temp_files": list(self.removed_temp_files),
            "kept_temp_files": list(self.kept_temp_files),
            "seconds": round(self.seconds, 3),
        }
