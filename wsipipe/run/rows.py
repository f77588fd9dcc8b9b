"""The per-slide result row, typed: what every runner returns and the archive files, the QA
report, the CLI and the Prefect artifacts read.

Its JSON form (``as_dict``; archive-results.json) is::

    {"slide": str, "name": str | None, "status": "ok" | "failed" | "skipped",
     "error": str | None, "out_dir": str | None, "summary": dict | None, "seconds": float,
     "started": str | None, "finished": str | None}

plus ``workers`` (stage -> worker address) for rows of a Dask run. ``started`` and
``finished`` are the slide's wall-clock start and end as UTC ISO 8601 timestamps
(``2026-01-31T02:00:05.123+00:00``), set where every row is made (:meth:`SlideResult.make`:
the end is "now", the start ``seconds`` earlier); rows written before they existed read back
with None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

Status = Literal["ok", "skipped", "failed"]
STATUSES: tuple[Status, ...] = ("ok", "skipped", "failed")


def error_line(error: BaseException | str) -> str:
    """An error as one line: its type and message (a typed error already names its file)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(str(text).split())[:500]


def utc_stamp(moment: datetime) -> str:
    """A UTC ISO 8601 timestamp with milliseconds."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class SlideResult:
    """One slide's result. ``workers`` is only set (and only serialised) for Dask runs."""

    slide: str
    status: Status
    name: str | None = None
    error: str | None = None
    out_dir: str | None = None
    summary: dict | None = None
    seconds: float = 0.0
    workers: dict[str, str] | None = field(default=None)
    started: str | None = None
    finished: str | None = None

    @classmethod
    def make(
        cls, slide: str | Path, status: str, *, name: str | None = None, error: BaseException | str | None = None,
        out_dir: str | Path | None = None, summary: dict | None = None, seconds: float = 0.0,
        workers: dict[str, str] | None = None, finished: datetime | None = None,
    ) -> SlideResult:
        """A row ending ``finished`` (default: now) after ``seconds`` of work."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        end = finished or datetime.now(UTC)
        return cls(
            slide=str(slide), status=cast(Status, status),  # checked above
            name=name, error=error_line(error) if error is not None else None,
            out_dir=str(out_dir) if out_dir is not None else None, summary=summary,
            seconds=round(float(seconds), 3), workers=workers,
            started=utc_stamp(end - timedelta(seconds=float(seconds))), finished=utc_stamp(end),
        )

    @classmethod
    def of(cls, row: SlideResult | Mapping[str, Any]) -> SlideResult:
        """A row read back from JSON (or already typed)."""
        if isinstance(row, SlideResult):
            return row
        return cls(
            slide=row["slide"], status=row["status"], name=row.get("name"), error=row.get("error"),
            out_dir=row.get("out_dir"), summary=row.get("summary"), seconds=row.get("seconds") or 0.0,
            workers=row.get("workers"), started=row.get("started"), finished=row.get("finished"),
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON row of archive-results.json."""
        out: dict[str, Any] = {
            "slide": self.slide, "name": self.name, "status": self.status, "error": self.error,
            "out_dir": self.out_dir, "summary": self.summary, "seconds": self.seconds,
            "started": self.started, "finished": self.finished,
        }
        if self.workers is not None:
            out["workers"] = self.workers
        return out
