"""Safe weight-file I/O: formats told by content, refused pickles, corruption reports, atomic saves, folders."""

from __future__ import annotations

import contextlib
import json
import os
import pickle

import pytest
import safetensors.torch
import torch
from torch import nn

from ldm.checkpoints.files import (
    detect_format,
    find_weights_file,
    load_checkpoint,
    load_into,
    load_state_dict,
    save_state_dict,
)
from ldm.errors import (
    CheckpointError,
    CorruptCheckpointError,
    GitLfsPointerError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4c8ef6a0b4e5b0a1f4b0d3d5e9f2c7a1b3d5e7f9a1c3e5b7d9f1a3c5e7b9d1f3\n"
    "size 4265380512\n"
)


@pytest.fixture
def state():
    """Mixed dtypes, so that a round trip that converted anything would be caught."""
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "norm.bias": torch.randn(4, generator=generator).half(),
        "embed.weight": torch.randn(5, 2, generator=generator).bfloat16(),
        "counter": torch.arange(3),
    }


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def reason(load, error_type=CheckpointError) -> str:
    """Runs `load`, expecting `error_type`; returns its text without the path, whose test-named folder could match."""
    with pytest.raises(error_type) as caught:
        load()
    return str(caught.value).removeprefix(f"{caught.value.path}: ")


class Payload:
    """Unpickling this runs `code`: the shape of a malicious checkpoint."""

    def __init__(self, function, code):
        self.function, self.code = function, code

    def __reduce__(self):
        return self.function, (self.code,)


# --- detect_format -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write, name, expected",
    [
        (lambda s, p: safetensors.torch.save_file(s, p), "model.ckpt", "safetensors"),
        (lambda s, p: torch.save(s, p), "model.safetensors", "torch_zip"),
        (lambda s, p: torch.save(s, p, _use_new_zipfile_serialization=False), "model.bin", "pickle"),
        (lambda s, p: p.write_text(LFS_POINTER), "model.safetensors", "git_lfs_pointer"),
        (lambda s, p: p.write_text(json.dumps({"weight_map": {"a": "a.bin"}})), "x.bin", "shard_index"),
    ],
)
def test_format_comes_from_content_not_extension(tmp_path, state, write, name, expected):
    path = tmp_path / name
    write({"a": state["conv.weight"]}, path)
    assert detect_format(path) == expected


def test_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    # A 128-byte header makes the file start with b"\x80", the pickle protocol byte.
    path = tmp_path / "w.safetensors"
    header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode().ljust(128)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
    assert path.read_bytes()[:1] == b"\x80"
    assert detect_format(path) == "safetensors"
    assert load_state_dict(path)["t"].tolist() == [0.0]


@pytest.mark.parametrize(
    "content, seen",
    [
        (b"", "empty (0 bytes)"),
        (b"\x80\x02", "2 bytes"),
        (bytes(range(7, 7 + 100)), "100 bytes"),
        (b"<!DOCTYPE html><html>404 Not Found</html>", "DOCTYPE"),
        (b'{"not": "an index"}', "no 'weight_map'"),
    ],
)
def test_empty_tiny_or_unknown_files_are_corrupt_and_named(tmp_path, content, seen):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as caught:
        detect_format(path)
    assert str(path) in str(caught.value) and seen in str(caught.value)
    with pytest.raises(CorruptCheckpointError):
        load_state_dict(path)


def test_missing_file_is_file_not_found_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_lfs_pointer_tells_to_pull(tmp_path):
    path = tmp_path / "v1-5-pruned.safetensors"
    path.write_text(LFS_POINTER)
    text = reason(lambda: load_state_dict(path), GitLfsPointerError)
    assert "git lfs pull" in text and "4,265,380,512-byte" in text


# --- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".pth", ".bin"])
def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path, state, suffix):
    path = save_state_dict(state, tmp_path / f"model{suffix}", metadata={"format": "pt", "step": "12"})
    checkpoint = load_checkpoint(path)
    assert_same_tensors(checkpoint.tensors, state)
    assert checkpoint.metadata == {"format": "pt", "step": "12"}
    assert files_in(tmp_path) == [f"model{suffix}"]  # no temporary file left behind


def test_ckpt_is_saved_in_the_compvis_layout_and_bin_plain(tmp_path, state):
    save_state_dict(state, tmp_path / "a.ckpt")
    save_state_dict(state, tmp_path / "b.bin")
    assert list(torch.load(tmp_path / "a.ckpt", weights_only=True)) == ["state_dict"]
    assert_same_tensors(torch.load(tmp_path / "b.bin", weights_only=True), state)


def test_safetensors_named_ckpt_loads(tmp_path, state):
    path = tmp_path / "model.ckpt"
    safetensors.torch.save_file(state, path, metadata={"source": "lying name"})
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "safetensors" and checkpoint.metadata == {"source": "lying name"}
    assert_same_tensors(checkpoint.tensors, state)


def test_legacy_pickle_format_loads(tmp_path, state):
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same_tensors(load_state_dict(path), state)


def test_compvis_wrapper_is_unwrapped_and_scalars_kept_as_metadata(tmp_path, state):
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {**state, "note": "not a tensor"}, "global_step": 470000, "epoch": 3}, path)
    checkpoint = load_checkpoint(path)
    assert_same_tensors(checkpoint.tensors, state)
    assert checkpoint.metadata == {"global_step": 470000, "epoch": 3}


def test_model_key_is_unwrapped_only_when_it_holds_tensors(tmp_path, state):
    torch.save({"model": state, "epoch": 1}, tmp_path / "a.pt")
    assert_same_tensors(load_state_dict(tmp_path / "a.pt"), state)
    torch.save({"model": "resnet", **state}, tmp_path / "b.pt")
    assert_same_tensors(load_state_dict(tmp_path / "b.pt"), state)


@pytest.mark.parametrize(
    "content, expected",
    [(torch.ones(2), "holds a Tensor, not a dict"), ({"nested": {"w": torch.ones(2)}}, "no tensors at its top level")],
)
def test_pickle_without_a_readable_state_dict_is_refused(tmp_path, content, expected):
    torch.save(content, tmp_path / "x.pt")
    assert expected in reason(lambda: load_state_dict(tmp_path / "x.pt"))


def test_tensors_sharing_storage_are_saved_as_separate_compact_tensors(tmp_path):
    base = torch.arange(1000, dtype=torch.float32)
    tied = torch.randn(3, 4)
    state = {"tied.a": tied, "tied.b": tied, "slice": base[10:14], "transposed": tied.t()}
    for name in ("s.safetensors", "s.pt"):
        save_state_dict(state, tmp_path / name)
        assert_same_tensors(load_state_dict(tmp_path / name), state)
    # The 4-element slice must not drag its 4000-byte storage into the file.
    assert (tmp_path / "s.pt").stat().st_size < 4000


def test_save_rejects_unknown_extensions_and_non_tensors(tmp_path, state):
    with pytest.raises(ValueError, match=".safetensors"):
        save_state_dict(state, tmp_path / "model.weights")
    with pytest.raises(ValueError, match="global_step"):
        save_state_dict({**state, "global_step": 5}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="str to str"):
        save_state_dict(state, tmp_path / "model.safetensors", metadata={"step": 5})
    with pytest.raises(ValueError, match="'state_dict'"):
        save_state_dict(state, tmp_path / "model.ckpt", metadata={"state_dict": "x"})
    assert files_in(tmp_path) == []


# --- malicious pickles ---------------------------------------------------------------------------------------------


def _system_payload(marker):
    return Payload(os.system, f"touch {marker}")


def _exec_payload(marker):
    return Payload(exec, f"open({str(marker)!r}, 'w').close()")


@pytest.mark.parametrize(
    "payload, save, imported",
    [
        (_system_payload, lambda obj, p: torch.save({"w": torch.ones(2), "x": obj}, p), "system"),
        (_exec_payload, lambda obj, p: torch.save({"x": obj}, p, _use_new_zipfile_serialization=False), "exec"),
        (_exec_payload, lambda obj, p: p.write_bytes(pickle.dumps({"x": obj}, protocol=4)), "builtins.exec"),
    ],
    ids=["torch_zip-os.system", "legacy-exec", "raw-protocol4-exec"],
)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, save, imported):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.ckpt"
    save(payload(marker), path)

    message = reason(lambda: load_state_dict(path), UnsafeCheckpointError)
    assert imported in message and "Nothing in it was executed" in message and ".safetensors" in message
    assert not marker.exists()

    # Control: an unrestricted load does run the payload, so the absent marker above proves the refusal.
    with contextlib.suppress(Exception):
        torch.load(path, weights_only=False)
    assert marker.exists()


# --- corruption ----------------------------------------------------------------------------------------------------


def test_truncated_safetensors_is_corrupt(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_state_dict(state, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert "the file is truncated" in reason(lambda: load_state_dict(path), CorruptCheckpointError)
    path.write_bytes(data[:40])  # cut inside the header
    assert "the file is truncated" in reason(lambda: load_state_dict(path), CorruptCheckpointError)


def test_safetensors_with_broken_json_header_is_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # missing the closing brace
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
    assert "not valid JSON" in reason(lambda: load_state_dict(path), CorruptCheckpointError)


def test_safetensors_whose_header_disagrees_with_its_data_is_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
    assert "safetensors cannot read it" in reason(lambda: load_state_dict(path), CorruptCheckpointError)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_torch_files_are_corrupt_not_unsafe(tmp_path, state, legacy, keep):
    path = tmp_path / "model.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert "truncated or damaged" in reason(lambda: load_state_dict(path), CorruptCheckpointError)


# --- atomic saves --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, function, suffix",
    [(safetensors.torch, "save_file", ".safetensors"), (torch, "save", ".ckpt")],
)
def test_interrupted_save_leaves_the_old_file_and_no_partial_one(tmp_path, state, monkeypatch, module, function,
                                                                 suffix):
    path = tmp_path / f"model{suffix}"

    def write_half_then_fail(obj, target, **kwargs):
        with open(target, "wb") as stream:
            stream.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, function, write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_state_dict(state, path)
    assert files_in(tmp_path) == []

    path.write_bytes(b"previous weights")
    with pytest.raises(OSError):
        save_state_dict(state, path)
    assert files_in(tmp_path) == [path.name] and path.read_bytes() == b"previous weights"


# --- load_into -----------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("cache", torch.zeros(4), persistent=False)


def test_load_into_copies_and_casts_to_the_module_dtype():
    module = Tiny()
    source = {key: torch.randn_like(value).half() for key, value in Tiny().state_dict().items()}
    load_into(module, source)  # "cache" is non-persistent, so it is not missing
    for key, value in module.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, source[key].float()), key


def test_load_into_lists_every_problem_before_touching_the_module():
    module = Tiny()
    before = {key: value.clone() for key, value in module.state_dict().items()}
    source = dict(Tiny().state_dict())
    del source["norm.bias"]
    source["proj.weight"] = torch.zeros(5, 3)
    source["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as caught:
        load_into(module, source, path="unet.safetensors")
    error = caught.value
    assert error.missing == ["norm.bias"] and error.unexpected == ["extra.weight"]
    assert error.shape_mismatches == [("proj.weight", (5, 3), (2, 3))]
    assert "unet.safetensors" in str(error) and "norm.bias" in str(error) and "(5, 3)" in str(error)
    assert all(torch.equal(module.state_dict()[key], value) for key, value in before.items())


def test_load_into_non_strict_tolerates_missing_and_unexpected_but_not_shapes():
    module = Tiny()
    source = {"proj.weight": torch.ones(2, 3), "extra": torch.ones(1)}
    result = load_into(module, source, strict=False)
    assert torch.equal(module.proj.weight, torch.ones(2, 3))
    assert "norm.weight" in result.missing_keys and result.unexpected_keys == ["extra"]
    text = reason(lambda: load_into(module, {"proj.weight": torch.ones(3, 3)}, strict=False), StateDictMismatchError)
    assert "proj.weight checkpoint (3, 3) vs model (2, 3)" in text


# --- component folders ---------------------------------------------------------------------------------------------


def test_find_weights_prefers_safetensors_and_ignores_variants_unless_asked(tmp_path, state):
    save_state_dict(state, tmp_path / "diffusion_pytorch_model.bin")
    save_state_dict(state, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert find_weights_file(tmp_path).name == "diffusion_pytorch_model.bin"
    assert find_weights_file(tmp_path, variant="fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    save_state_dict(state, tmp_path / "diffusion_pytorch_model.safetensors")
    assert find_weights_file(tmp_path).name == "diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_state_dict(tmp_path), state)  # a folder resolves to its weights file


def test_find_weights_lists_the_folder_when_nothing_fits(tmp_path, state):
    save_state_dict(state, tmp_path / "model.fp16.safetensors")
    (tmp_path / "config.json").write_text("{}")
    message = reason(lambda: find_weights_file(tmp_path))
    assert "config.json" in message and "model.fp16.safetensors" in message and 'variant="fp16"' in message


@pytest.mark.parametrize("extension", ["safetensors", "bin"])
def test_sharded_weights_are_merged(tmp_path, state, extension):
    keys = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.{extension}": keys[i::2] for i in range(2)}
    for shard, shard_keys in shards.items():
        save_state_dict({key: state[key] for key in shard_keys}, tmp_path / shard)
    weight_map = {key: shard for shard, shard_keys in shards.items() for key in shard_keys}
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (tmp_path / f"model.{extension}.index.json").write_text(json.dumps(index))

    found = find_weights_file(tmp_path, names=("model",))
    assert found.name == f"model.{extension}.index.json"
    checkpoint = load_checkpoint(found)
    assert_same_tensors(checkpoint.tensors, state)
    assert checkpoint.metadata == {"total_size": 123}

    os.remove(tmp_path / next(iter(shards)))
    assert "missing from" in reason(lambda: load_state_dict(found))


def test_shard_index_cannot_point_outside_its_folder(tmp_path, state):
    save_state_dict(state, tmp_path / "secret.safetensors")
    (tmp_path / "sub").mkdir()
    index = tmp_path / "sub" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    assert "not a file in its folder" in reason(lambda: load_state_dict(index), CorruptCheckpointError)


def test_index_listing_tensors_its_shards_lack_is_corrupt(tmp_path, state):
    save_state_dict(state, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {key: "model-00001-of-00001.safetensors" for key in [*state, "ghost.weight"]}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert "lack 1 tensors the index lists (ghost.weight)" in reason(lambda: load_state_dict(index))
