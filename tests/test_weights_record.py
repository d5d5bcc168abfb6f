"""weights.md records every shipped file with its sha256: the record and the files must not drift apart."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORD = re.compile(r"^- `(ldm/weights/[^`]+)`: `([0-9a-f]{64})`$", re.MULTILINE)


def test_weights_md_lists_every_shipped_file_with_its_sha256():
    recorded = dict(RECORD.findall((REPO / "weights.md").read_text(encoding="utf-8")))
    shipped = {path.relative_to(REPO).as_posix() for path in (REPO / "ldm" / "weights").rglob("*")
               if path.is_file() and path.name != ".gitkeep"}
    assert shipped == set(recorded), "weights.md and ldm/weights/ list different files"
    wrong = [path for path, digest in recorded.items()
             if hashlib.sha256((REPO / path).read_bytes()).hexdigest() != digest]
    assert not wrong, f"sha256 in weights.md differs from the file: {wrong}"
