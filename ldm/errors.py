"""Typed errors. Each one names the file or argument at fault and says how to fix it."""

from __future__ import annotations

from pathlib import Path


class LdmError(Exception):
    """Base class of every error raised on purpose by `ldm`."""


class CheckpointError(LdmError, ValueError):
    """A checkpoint file or folder cannot be used. `path` names it."""

    def __init__(self, path: str | Path | None, message: str):
        self.path = None if path is None else str(path)
        prefix = f"{self.path}: " if self.path else ""
        super().__init__(prefix + message)


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged or in no format we can read."""


class GitLfsPointerError(CheckpointError):
    """The file is a git-LFS pointer, not the weights it points to."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint asks to run code (or build objects) beyond plain tensors."""


class UnknownArchitectureError(CheckpointError):
    """The weights match no model layout that `ldm` knows."""


class StateDictMismatchError(CheckpointError):
    """Keys are missing or unexpected, or shapes differ from the model's."""

    def __init__(
        self,
        path,
        missing: list[str] = (),
        unexpected: list[str] = (),
        shape_mismatches: list[tuple[str, tuple, tuple]] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shape_mismatches = list(shape_mismatches)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {abbreviate(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {abbreviate(self.unexpected)}")
        if self.shape_mismatches:
            shown = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatches]
            parts.append(f"shape mismatches ({len(shown)}): {abbreviate(shown)}")
        parts.append("the checkpoint does not fit this model config; check the config (or YAML) you load it with")
        super().__init__(path, "; ".join(parts))


def abbreviate(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
