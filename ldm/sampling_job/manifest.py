"""What a job has done, on disk. The PNGs are the truth; the manifest is a log that is rebuilt from them.

- An image is done when its PNG decodes and carries, in its settings, the request it was made for.
- Each rank appends one JSON line per finished or failed image to `manifest.rank<R>.jsonl` (flushed and fsynced
  before the next image starts). A kill -9 can leave a partial last line: readers skip it, and the next append
  cuts it off first.
- `merge` writes `manifest.jsonl` (atomically) once every work item is resolved: one line per item in job order,
  the latest matching log line, or, for a PNG whose line was lost to a kill between rename and append, a line
  rebuilt from the PNG itself. A log line that the PNG contradicts is dropped. Then the parts are deleted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from ldm.checkpoints.files import write_atomically
from ldm.metadata import read_settings
from ldm.sampling_job.work import Job, WorkItem

MANIFEST = "manifest.jsonl"
PART_PATTERN = "manifest.rank*.jsonl"


def is_done(path: Path, request: dict) -> bool:
    """The PNG exists, every chunk's CRC holds up to IEND, it decodes (reading its text chunks decodes it all),
    and it was made for `request`."""
    try:
        with Image.open(path) as image:
            image.verify()
        return read_settings(path).get("request") == request
    except Exception:  # missing, truncated, not a PNG, no settings, bad JSON: all mean "make it again"
        return False


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def line_for(item: WorkItem, status: str, **fields) -> dict:
    """A manifest line: which item, where its image is, and what happened (the request once, not again inside
    the image's settings)."""
    if "settings" in fields:
        fields["settings"] = {k: v for k, v in fields["settings"].items() if k != "request"}
    return {"key": item.key, "item": item.number, "source": item.source,
            "path": item.filename if item.request is not None else None, "status": status, "time": now(),
            "request": item.request, **fields}


class ManifestLog:
    """One rank's append-only log."""

    def __init__(self, folder: Path, rank: int):
        self.path = folder / f"manifest.rank{rank}.jsonl"
        self._handle = None

    def append(self, line: dict) -> None:
        if self._handle is None:
            self._handle = self._open()
        self._handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # cut a partial last line, or the next line would be glued onto it
            data = self.path.read_bytes()
            complete = data.rfind(b"\n") + 1
            if complete != len(data):
                os.truncate(self.path, complete)
        return open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_lines(path: Path) -> list[dict]:
    """The whole JSON objects in a log; partial or damaged lines are skipped."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and "key" in line:
            lines.append(line)
    return lines


@dataclass(frozen=True)
class Tally:
    ok: int
    failed: int
    missing: int  # items with neither an image nor a failure: the job is not finished
    path: Path | None  # manifest.jsonl, when it was written


def merge(job: Job) -> Tally:
    """Write manifest.jsonl when every item is resolved (done or failed); report what is missing otherwise."""
    folder = job.output
    history: dict[str, list[dict]] = {}
    for path in [folder / MANIFEST, *sorted(folder.glob(PART_PATTERN))]:
        for line in read_lines(path):
            history.setdefault(line["key"], []).append(line)
    lines = [_final_line(item, folder, history.get(item.key, [])) for item in job.items]
    resolved = [line for line in lines if line is not None]
    ok = sum(line["status"] == "ok" for line in resolved)
    if len(resolved) < len(lines):
        return Tally(ok, len(resolved) - ok, len(lines) - len(resolved), None)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in resolved)
    write_atomically(folder / MANIFEST, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    for part in folder.glob(PART_PATTERN):
        part.unlink()
    return Tally(ok, len(resolved) - ok, 0, folder / MANIFEST)


def _final_line(item: WorkItem, folder: Path, history: list[dict]) -> dict | None:
    if item.error is not None:  # a bad prompt line recorded under on_bad_line=record
        return line_for(item, "failed", error=item.error)
    matching = [line for line in history if line.get("request") == item.request]
    if is_done(folder / item.filename, item.request):
        made = [line for line in matching if line.get("status") == "ok"]
        return _latest(made) if made else _line_from_png(item, folder / item.filename)
    failures = [line for line in matching if line.get("status") == "failed"]
    return _latest(failures) if failures else None


def _latest(lines: list[dict]) -> dict:
    return max(lines, key=lambda line: str(line.get("time")))  # ISO 8601 UTC times sort as text


def _line_from_png(item: WorkItem, path: Path) -> dict:
    made = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="milliseconds")
    return {**line_for(item, "ok", settings=read_settings(path)), "time": made}


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed run left: save_png's `.<name>.tmp` and the manifest's `.<name>.<id>.partial`.
    Called only when no process of the job is writing."""
    for pattern in (".*.png.tmp", ".*.partial"):
        for path in [*folder.glob(pattern), *(folder / "grids").glob(pattern)]:
            path.unlink(missing_ok=True)
