"""Safe weight-file I/O: every weight file `ldm` reads or writes goes through this module.

Formats are recognised from a file's first bytes, never from its name, because downloaded checkpoints are often
misnamed. Pickles are only opened with torch's restricted (`weights_only`) unpickler: a checkpoint is data, and one
that asks to import anything more is refused before any of it runs. Saves are atomic, so a crash or a full disk never
leaves a half-written file under the real name.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import pickletools
import re
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from ldm.errors import (
    CheckpointError,
    CorruptCheckpointError,
    GitLfsPointerError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    abbreviate,
)

DEFAULT_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
# Per weights name, in order of preference: safetensors before pickles, a single file before a sharded index.
_WEIGHT_ENDINGS = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SNIFF_BYTES = 64
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library refuses longer headers too
# torch's pre-zip format is five pickles back to back (magic number, protocol, system info, the object, storage
# keys) followed by raw storage bytes, which must not be read as a pickle.
_LEGACY_TORCH_PICKLES = 5
# A plain tensor checkpoint imports only torch's tensor rebuilders and OrderedDict; anything else is worth naming.
_TENSOR_PICKLE_MODULES = ("torch", "collections")
_MEMO_STORES = ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")
_MEMO_LOADS = ("GET", "BINGET", "LONG_BINGET")
_CONVERT_HINT = (
    "If you trust its source, convert that copy once in a throwaway environment (torch.load(..., "
    "weights_only=False), then ldm.checkpoints.files.save_state_dict(..., 'model.safetensors')) and load the "
    ".safetensors file instead"
)


@dataclass
class Checkpoint:
    """What a weights file holds: its tensors, and the non-tensor facts stored beside them."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, object]  # safetensors `__metadata__`, an index's "metadata", or a pickle's scalars
    format: str  # as detect_format names it


def detect_format(path: str | Path) -> str:
    """Names a weights file's format from its first bytes.

    Returns "safetensors", "torch_zip" (torch.save), "pickle" (legacy torch.save, or any pickle), "shard_index" (the
    .index.json of a sharded checkpoint) or "git_lfs_pointer" (which load_checkpoint refuses with GitLfsPointerError).
    Raises FileNotFoundError when nothing is at `path`, CorruptCheckpointError when the file is empty, too small or
    in no format above.
    """
    path = _existing_file(path)
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(_SNIFF_BYTES)
    if size < 8:
        raise CorruptCheckpointError(
            path, f"{_describe(head, size)}: too small to be a weights file; it is probably an interrupted "
            "download or copy, fetch it again"
        )
    if _has_safetensors_signature(head):
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head.startswith(b"\x80"):
        return "pickle"
    if head.startswith(b"version https://git-lfs"):
        return "git_lfs_pointer"
    if head.lstrip().startswith(b"{"):
        _read_shard_index(path)
        return "shard_index"
    raise CorruptCheckpointError(
        path, f"{_describe(head, size)} is in no format ldm reads (safetensors, a torch.save .ckpt/.pt/.bin, or a "
        "sharded .index.json); it may be damaged, or an error page saved by a failed download"
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Reads a weights file, shard index or diffusers component folder into tensors on `device`, with metadata.

    CompVis wrappers ({"state_dict": ..., "global_step": ...}) are unwrapped and non-tensor entries dropped; the
    wrapper's scalar entries become the metadata.
    """
    path = Path(path)
    if path.is_dir():
        path = find_weights_file(path)
    file_format = detect_format(path)
    if file_format == "shard_index":
        tensors, metadata = _read_shards(path, device)
    else:
        tensors, metadata = _read_weights(path, file_format, device)
    return Checkpoint(tensors, metadata, file_format)


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see load_checkpoint), without its metadata."""
    return load_checkpoint(path, device).tensors


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Writes tensors to `path` atomically, in the format its extension names.

    `.safetensors` is the format to prefer; `.ckpt`, `.pt`, `.pth` and `.bin` go through torch.save. A `.ckpt` is
    wrapped as {"state_dict": ..., **metadata} like CompVis checkpoints; the others hold the plain dict unless
    metadata is given, which then needs the same wrapper.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise ValueError(
            f"cannot tell which format to write from the name {path.name!r}: end it with .safetensors "
            f"(recommended) or one of {', '.join(_TORCH_SUFFIXES)}"
        )
    _check_saveable(state, metadata)
    tensors = _with_own_storage(state)
    if suffix == ".safetensors":
        write_atomically(path, lambda target: safetensors.torch.save_file(tensors, target, metadata=metadata))
    else:
        wrapped = suffix == ".ckpt" or bool(metadata)
        payload = {"state_dict": tensors, **(metadata or {})} if wrapped else tensors
        write_atomically(path, lambda target: torch.save(payload, target))
    return path


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
    strict: bool = True,
):
    """Copies `state_dict` into `module` after checking that it fits; each tensor takes its parameter's dtype.

    Keys and shapes are compared before anything is copied, so a bad checkpoint raises StateDictMismatchError
    (listing missing, unexpected and mis-shaped keys; `path` names the file in it) and leaves the module as it was.
    With strict=False only shape mismatches raise. Returns torch's (missing_keys, unexpected_keys).
    """
    expected = module.state_dict()  # persistent entries only: non-persistent buffers are never "missing"
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        (key, tuple(state_dict[key].shape), tuple(target.shape))
        for key, target in expected.items()
        if key in state_dict and state_dict[key].shape != target.shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictMismatchError(path, missing, unexpected, mismatched)
    return module.load_state_dict(state_dict, strict=strict)  # copy_ casts each tensor to its parameter's dtype


def find_weights_file(
    folder: str | Path, names: tuple[str, ...] = DEFAULT_WEIGHT_NAMES, variant: str | None = None
) -> Path:
    """Picks the weights file of a diffusers or transformers component folder.

    For each name in order it tries `<name>.safetensors`, its sharded `.safetensors.index.json`, `<name>.bin` and
    `.bin.index.json` (load_state_dict reads an index by merging its shards). With `variant="fp16"` it looks for
    diffusers' variant spelling (`<name>.fp16.safetensors`, `<name>.safetensors.index.fp16.json`) instead; variant
    files are never picked unasked.
    """
    folder = _existing(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "is a file, not a component folder; pass it to load_state_dict directly")
    candidates = [_with_variant(name + ending, variant) for name in names for ending in _WEIGHT_ENDINGS]
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    held = sorted(entry.name for entry in folder.iterdir())
    hint = "" if variant else '; for variant files such as <name>.fp16.safetensors pass variant="fp16"'
    raise CheckpointError(
        folder, f"holds no weights file ({', '.join(candidates)}); it holds: {abbreviate(held) or 'nothing'}{hint}"
    )


# --- reading -------------------------------------------------------------------------------------------------------


def _read_weights(path: Path, file_format: str, device) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    if file_format == "git_lfs_pointer":
        raise _lfs_pointer_error(path)
    if file_format == "safetensors":
        return _read_safetensors(path, device)
    return _read_pickle(path, file_format, device)


def _read_safetensors(path: Path, device) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    header = _safetensors_header(path)
    try:
        tensors = safetensors.torch.load_file(path, device=str(device))
    except SafetensorError as error:
        raise CorruptCheckpointError(path, f"safetensors cannot read it ({error}); download it again") from error
    return tensors, dict(header.get("__metadata__") or {})


def _safetensors_header(path: Path) -> dict:
    """Parses and checks the JSON header, so that truncation is reported as such rather than as a parse error."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        header_length = int.from_bytes(stream.read(8), "little")
        if 8 + header_length > size:
            raise CorruptCheckpointError(
                path, f"its header claims {header_length} bytes but only {size - 8} follow: the file is truncated; "
                "download it again"
            )
        raw_header = stream.read(header_length)
    try:
        header = json.loads(raw_header)
    except ValueError as error:  # bad JSON and bad UTF-8 alike
        raise CorruptCheckpointError(path, f"its header is not valid JSON ({error}); download it again") from error
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "its header is JSON but not an object; the file is damaged")
    data_size = size - 8 - header_length
    for name, entry in header.items():
        if name != "__metadata__":
            _check_data_offsets(path, name, entry, data_size)
    return header


def _check_data_offsets(path: Path, name: str, entry: object, data_size: int) -> None:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CorruptCheckpointError(path, f"tensor {name!r} has no valid data_offsets in the header; it is damaged")
    if offsets[1] > data_size:
        raise CorruptCheckpointError(
            path, f"tensor {name!r} ends at byte {offsets[1]} of the data, which holds only {data_size} bytes: the "
            "file is truncated; download it again"
        )


def _read_pickle(path: Path, file_format: str, device) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    try:
        # Loaded to the CPU first, so that a failure here is the file's fault and never the device's.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refusal:
        # `from None`: torch's own text suggests weights_only=False, the unsafe way out this module exists to avoid.
        raise _refusal_error(path, file_format, refusal) from None
    except (RuntimeError, EOFError) as error:
        raise CorruptCheckpointError(
            path, f"torch cannot read it ({_first_line(error)}): the file is truncated or damaged; download it again"
        ) from error
    tensors, metadata = _split_pickled(path, loaded)
    return {key: tensor.to(device) for key, tensor in tensors.items()}, metadata


def _split_pickled(path: Path, loaded: object) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Finds the state dict in what torch.load returned; the scalar entries around it become metadata."""
    if not isinstance(loaded, dict):
        raise CheckpointError(
            path, f"holds a {type(loaded).__name__}, not a dict of tensors; save model.state_dict(), not the model"
        )
    weights = _unwrapped(loaded)
    tensors = {key: value for key, value in weights.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            path, f"holds no tensors at its top level or under 'state_dict' or 'model' (its keys: "
            f"{abbreviate(sorted(map(str, loaded)))}); it is not a weights file ldm can read"
        )
    metadata = {key: value for key, value in loaded.items() if isinstance(value, (bool, int, float, str))}
    return tensors, metadata


def _unwrapped(loaded: dict) -> dict:
    """CompVis/Lightning checkpoints keep the weights under "state_dict"; some trainers under "model"."""
    if isinstance(loaded.get("state_dict"), dict):
        return loaded["state_dict"]
    model = loaded.get("model")
    if isinstance(model, dict) and model and all(isinstance(value, torch.Tensor) for value in model.values()):
        return model
    return loaded


def _refusal_error(path: Path, file_format: str, refusal: pickle.UnpicklingError) -> CheckpointError:
    """Tells a damaged pickle (which torch's unpickler also refuses) from one that asks for more than tensors."""
    try:
        imports = _pickle_imports(path, file_format)
    except (ValueError, EOFError):  # pickletools' verdict on truncated or garbled opcodes
        return CorruptCheckpointError(path, "its pickle data is truncated or damaged; download it again")
    foreign = [name for name in dict.fromkeys(imports) if name.split(".")[0] not in _TENSOR_PICKLE_MODULES]
    refused = f"it imports {', '.join(foreign)}" if foreign else f"torch refused it: {_refusal_reason(refusal)}"
    return UnsafeCheckpointError(
        path, f"this pickle was not loaded because {refused}. Weights need nothing beyond tensors and plain "
        f"containers, so it may be an attempt to run code. Nothing in it was executed. {_CONVERT_HINT}"
    )


def _pickle_imports(path: Path, file_format: str) -> list[str]:
    """The `module.name` globals a checkpoint's pickle imports, read from its opcodes without running any."""
    if file_format == "torch_zip":
        with _open_zip(path) as archive, archive.open(_data_pickle_name(path, archive)) as stream:
            return _imports_in_pickles(stream, 1)
    with open(path, "rb") as stream:
        return _imports_in_pickles(stream, _LEGACY_TORCH_PICKLES)


def _imports_in_pickles(stream, max_pickles: int) -> list[str]:
    imports = []
    for _ in range(max_pickles):
        if not stream.peek(1):
            break
        imports += _imports_in_pickle(stream)
    return imports


def _imports_in_pickle(stream) -> list[str]:
    """Walks one pickle's opcodes, tracking pushed strings and the memo just enough to name STACK_GLOBAL imports."""
    imports, pushed, memo = [], [], {}
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name in _MEMO_STORES:
            memo[len(memo) if argument is None else argument] = pushed[-1] if pushed else None
            continue
        if opcode.name in ("GLOBAL", "INST"):
            imports.append(argument.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            module, name = ([None, None] + pushed)[-2:]
            known = isinstance(module, str) and isinstance(name, str)
            imports.append(f"{module}.{name}" if known else "a global whose name is built at load time")
        loaded = memo.get(argument) if opcode.name in _MEMO_LOADS else argument
        pushed.append(loaded if isinstance(loaded, str) else None)
    return imports


def _refusal_reason(refusal: pickle.UnpicklingError) -> str:
    """The line of torch's (long) refusal message that says what it refused."""
    lines = [line.strip() for line in str(refusal).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CorruptCheckpointError(
            path, f"its zip structure is broken ({error}): the file is truncated or damaged; download it again"
        ) from error


def _data_pickle_name(path: Path, archive: zipfile.ZipFile) -> str:
    names = [name for name in archive.namelist() if name.endswith("data.pkl")]
    if not names:
        raise CorruptCheckpointError(path, "is a zip archive but not a torch.save file (no data.pkl inside)")
    return names[0]


def _read_shards(path: Path, device) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Merges the shards a sharded checkpoint's index names, checking that they hold every key it lists."""
    index = _read_shard_index(path)
    weight_map = index["weight_map"]
    tensors = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = _shard_path(path, shard_name)
        shard_format = detect_format(shard)
        if shard_format == "shard_index":
            raise CorruptCheckpointError(shard, f"is an index, but {path.name} lists it as a shard")
        tensors.update(_read_weights(shard, shard_format, device)[0])
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CorruptCheckpointError(
            path, f"its shards lack {len(absent)} tensors the index lists ({abbreviate(absent)}); a shard is "
            "outdated or damaged, download the shards again"
        )
    return tensors, dict(index.get("metadata") or {})


def _read_shard_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_bytes())
    except ValueError as error:
        raise CorruptCheckpointError(
            path, f"starts like JSON but does not parse ({error}), so it is neither weights nor a shard index"
        ) from error
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CorruptCheckpointError(path, "is JSON but not a shard index (no 'weight_map'), and not weights")
    return index


def _shard_path(index_path: Path, shard_name: object) -> Path:
    # Only plain file names: an index must not point a load at files outside its own folder.
    if not isinstance(shard_name, str) or Path(shard_name).name != shard_name:
        raise CorruptCheckpointError(index_path, f"names shard {shard_name!r}, which is not a file in its folder")
    shard = index_path.parent / shard_name
    if not shard.is_file():
        raise CheckpointError(
            index_path, f"lists shard {shard_name}, which is missing from {index_path.parent}; download every shard"
        )
    return shard


def _lfs_pointer_error(path: Path) -> GitLfsPointerError:
    size = re.search(r"^size (\d+)\s*$", path.read_text(errors="replace"), re.MULTILINE)
    real_file = f" to a {int(size[1]):,}-byte file" if size else ""
    return GitLfsPointerError(
        path, f"is a git-LFS pointer{real_file}, not the weights themselves: run `git lfs pull` in its repository "
        "(after `git lfs install`), or download the file itself"
    )


# --- writing -------------------------------------------------------------------------------------------------------


def _check_saveable(state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise ValueError(
                f"state[{key!r}] is a {type(value).__name__}: save_state_dict takes str keys and tensors only; "
                "pass other facts as metadata={...} (str to str)"
            )
    for key, value in (metadata or {}).items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise ValueError(f"metadata[{key!r}] is a {type(value).__name__}: metadata maps str to str; use str(...)")
    if "state_dict" in (metadata or {}):
        raise ValueError("metadata cannot use the key 'state_dict': torch formats store the tensors under it")


def _with_own_storage(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gives each tensor a compact storage of its own.

    safetensors refuses tensors that share memory (tied weights), and torch.save would write the whole storage
    behind a view, so shared, strided or sliced tensors are cloned; all others are saved as they are.
    """
    seen_storages = set()
    owned = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen_storages
        seen_storages.add(storage.data_ptr())
        if shared or not tensor.is_contiguous() or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        owned[key] = tensor
    return owned


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Runs `write` on a temporary file beside `path`, flushes it to disk, then renames it over `path`.

    Readers see the old file or the whole new one, never a torn write. The temporary file sits in the same folder
    because a rename is only atomic within one file system.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable; only POSIX systems let a folder be opened for that."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- small helpers -------------------------------------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "nothing at this path; check it for typos", str(path))
    return path


def _existing_file(path: str | Path) -> Path:
    path = _existing(path)
    if path.is_dir():
        raise CheckpointError(path, "is a folder; pass the weights file inside it, or use find_weights_file(folder)")
    return path


def _has_safetensors_signature(head: bytes) -> bool:
    """An 8-byte little-endian header length, then the JSON header's '{'.

    The length cap keeps pickles out: a pickle whose ninth byte happens to be '{' would claim an absurd header.
    """
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and header_length <= _MAX_SAFETENSORS_HEADER


def _with_variant(file_name: str, variant: str | None) -> str:
    """diffusers' variant spelling: the variant goes before the last extension (x.fp16.safetensors)."""
    if not variant:
        return file_name
    stem, _, extension = file_name.rpartition(".")
    return f"{stem}.{variant}.{extension}"


def _describe(head: bytes, size: int) -> str:
    return "the file is empty (0 bytes)" if size == 0 else f"the file ({size} bytes, starting {head[:16]!r})"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
