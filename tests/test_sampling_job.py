"""`ldm sample`: config -> work items -> images that equal direct pipeline calls, a job that survives kill -9,
failures that stay local, rank splits that change nothing, and clear errors before anything is written."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_random_pipeline
from PIL import Image

from ldm.metadata import read_settings, regenerate_kwargs
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling_job import ConfigError, World, load_job, main, run_job
from ldm.sampling_job.config import sampler_name
from ldm.sampling_job.manifest import ManifestLog, read_lines

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "configs" / "sample"
TINY = ["width=16", "height=16", "steps=2"]  # keeps every image a few milliseconds on one CPU thread


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sampling") / "model"
    tiny_random_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(model) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.progress_bar = False
    return pipe


@pytest.fixture
def elsewhere(monkeypatch, tmp_path_factory):
    """The current folder is not the repository: the example configs name their inputs relative to themselves."""
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))


def write_config(folder: Path, **fields) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(fields, allow_unicode=True), encoding="utf-8")
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def direct(pipe, request: dict) -> np.ndarray:
    """The image a plain pipeline call makes for a job request: the reference every job image must equal."""
    image = pipe(request["prompt"], negative_prompt=request["negative_prompt"], seed=request["seed"],
                 height=request["height"], width=request["width"], num_inference_steps=request["steps"],
                 guidance_scale=request["guidance"], guidance_rescale=request["guidance_rescale"],
                 sampler=request["sampler"]).images[0]
    return np.asarray(image)


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_complete(job, folder: Path) -> None:
    """Every image once, readable, made for its request; one ok manifest line each, in job order; no leftovers."""
    lines = manifest(folder)
    assert [line["key"] for line in lines] == [item.key for item in job.items]
    assert all(line["status"] == "ok" for line in lines)
    for item in job.items:
        assert read_settings(folder / item.filename)["request"] == item.request
    names = {p.name for p in folder.iterdir() if p.is_file()}
    assert names == {item.filename for item in job.items} | {"manifest.jsonl"}  # no parts, .tmp or .partial


# ------------------------------------------------------------------------------------------------- the plan

def test_work_items_are_prompt_by_sweep_point_by_seed_with_stable_names(tmp_path, model):
    config = write_config(tmp_path, model=str(model), prompts=["a red circle", "Two (yellow:1.2) triangles!"],
                          seed=10, images_per_prompt=2, steps=[1, 2], sampler={"name": "euler_a"})
    job = load_job(config)
    assert [item.key for item in job.items] == [
        f"{n:04d}-{slug}-s{seed}-steps{steps}"
        for n, slug in enumerate(["a-red-circle", "two-yellow-1-2-triangles"])
        for steps in (1, 2) for seed in (10, 11)
    ]
    first = job.items[0].request
    assert first == {"model": str(model), "model_config": None, "dtype": "float32", "prompt": "a red circle",
                     "negative_prompt": "", "seed": 10, "width": None, "height": None, "steps": 1,
                     "guidance": 7.5, "guidance_rescale": 0.0, "sampler": "Euler a", "candidates": None}
    assert load_job(config).items == job.items  # the same config always gives the same plan


def test_jsonl_items_override_the_config_and_seeds_follow_the_pipeline_rule(tmp_path, model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a"}',
        "",  # blank lines are not items
        '{"prompt": "b", "seeds": [7, 3], "negative_prompt": "", "sampler": "dpmpp_2m", "steps": 5}',
        '{"prompt": "c", "seed": 100, "guidance": 1.0}',
    ]), encoding="utf-8")
    job = load_job(write_config(tmp_path, model=str(model), prompts=str(prompts), negative_prompt="blurry",
                                images_per_prompt=2, seed=1))
    got = [(i.number, i.request["prompt"], i.request["seed"], i.request["negative_prompt"], i.request["steps"],
            i.request["guidance"], i.request["sampler"]) for i in job.items]
    assert got == [
        (0, "a", 1, "blurry", 20, 7.5, None), (0, "a", 2, "blurry", 20, 7.5, None),
        (1, "b", 7, "", 5, 7.5, "DPM++ 2M"), (1, "b", 3, "", 5, 7.5, "DPM++ 2M"),
        (2, "c", 100, "blurry", 20, 1.0, None), (2, "c", 101, "blurry", 20, 1.0, None),
    ]
    assert job.items[2].source == f"{prompts}:3"


@pytest.mark.parametrize("spelling", ["Euler a", "euler_a", "EULER-A", "sample_euler_ancestral",
                                      "EulerAncestralDiscreteScheduler"])
def test_sampler_spellings_resolve_to_the_a1111_name(spelling):
    assert sampler_name(spelling) == "Euler a"


def test_a_schedule_picks_the_named_variant(tmp_path, model):
    job = load_job(write_config(tmp_path, model=str(model), prompts=["a"], sampler={"name": "dpmpp_2m",
                                                                                    "schedule": "karras"}))
    assert job.items[0].request["sampler"] == "DPM++ 2M Karras"


# -------------------------------------------------------------------------------------- errors before writes

BAD_CONFIGS = [
    ({"colour": "red"}, ["unknown field(s) ['colour']", "allowed:", "guidance"]),
    ({"sampler": {"name": "eulr"}}, ["sampler.name='eulr'", "valid names:", "Euler a", "DPM++ 2M Karras"]),
    ({"sampler": {"name": "DDIM", "schedule": "karras"}}, ["sampler.schedule='karras'", "DPM++ 2M"]),
    ({"steps": 0}, ["steps=0", "integer >= 1"]),
    ({"guidance": -1}, ["guidance=-1", ">= 0"]),
    ({"dtype": "float64"}, ["dtype='float64'", "float32, float16, bfloat16"]),
    ({"device": "gpu"}, ["device='gpu'", "cuda:N"]),
    ({"seeds": [1, 1]}, ["seeds=[1, 1]", "repeats"]),
    ({"steps": [1, 2], "guidance": [1, 2], "width": [8, 16], "height": [8, 16]}, ["at most 3 axes"]),
    ({"steps": [2, 2]}, ["steps=[2, 2]", "same value twice"]),
    ({"filename": "{item}-{colour}"}, ["filename='{item}-{colour}'", "{item}, {slug}, {seed}, {sweep}"]),
    ({"filename": "{item}", "images_per_prompt": 2}, ["the same name", "{seed}"]),
    ({"prompts": "missing.txt"}, ["prompts='missing.txt'", "no such file"]),
    ({"prompts": "prompts.csv"}, [".txt or .jsonl"]),
    ({"model": "no/such/model"}, ["model='no/such/model' does not exist"]),
    ({"width": 15}, ["width=15", "multiple of 2"]),  # needs the model: checked once loaded, still before writes
]


@pytest.mark.parametrize("fields, expected", BAD_CONFIGS)
def test_a_bad_config_gives_one_clear_message_exit_2_and_writes_nothing(tmp_path, model, capsys, fields,
                                                                       expected):
    config = write_config(tmp_path, **{"model": str(model), "prompts": ["a"], "output": str(tmp_path / "out"),
                                       "width": 16, "height": 16, "steps": 1, **fields})
    assert main(["sample", str(config)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("ldm sample: error:") and message.count("\n") == 0
    for part in expected:
        assert part in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, expected", [
    (b'{"prompt": "b"', ["prompts.jsonl:2", "not a JSON object"]),
    (b'{"prompt": "b", "stpes": 3}', ["prompts.jsonl:2", "unknown field(s) ['stpes']", "guidance"]),
    (b'{"prompt": "b", "steps": "many"}', ["prompts.jsonl:2", "steps='many'"]),
    (b'{"prompt": "\xff"}', ["prompts.jsonl:2", "not UTF-8"]),
    (b'{"prompt": "b", "steps": 3}', ["prompts.jsonl:2", "sets steps, which the config sweeps"]),
])
def test_a_bad_prompt_line_is_named_by_file_and_line_before_any_work(tmp_path, model, line, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "a"}\n' + line + b"\n")
    with pytest.raises(ConfigError) as error:
        load_job(write_config(tmp_path, model=str(model), prompts=str(prompts), steps=[1, 2]))
    for part in expected:
        assert part in str(error.value)


def test_on_bad_line_record_logs_the_line_as_failed_and_makes_the_rest(tmp_path, model, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xffbroken\ntwo yellow triangles\n")
    out = tmp_path / "out"
    config = write_config(tmp_path, model=str(model), prompts=str(prompts), on_bad_line="record",
                          output=str(out), width=16, height=16, steps=1)
    assert main(["sample", str(config)]) == 1
    assert "1 images failed" in capsys.readouterr().err
    lines = manifest(out)
    assert [(line["item"], line["status"]) for line in lines] == [(0, "ok"), (1, "failed"), (2, "ok")]
    assert lines[1]["source"] == f"{prompts}:2" and "not UTF-8" in lines[1]["error"]
    assert lines[1]["path"] is None


# -------------------------------------------------------------------------------------- the example configs

def test_batch_example_images_equal_direct_calls_and_carry_their_settings(tmp_path, model, pipe, elsewhere, capsys):
    out = tmp_path / "batch"
    assert main(["sample", str(EXAMPLES / "batch.yaml"), f"model={model}", *TINY, "--output", str(out)]) == 0
    job = load_job(EXAMPLES / "batch.yaml", [f"model={model}", *TINY, f"output={out}"])
    assert len(job.items) == 16  # 4 prompts x 4 seeds
    for item in job.items:
        assert np.array_equal(pixels(out / item.filename), direct(pipe, item.request))
    settings = read_settings(out / job.items[-1].filename)
    assert regenerate_kwargs(settings) == {
        "prompt": "青い四角の左に赤い丸", "negative_prompt": "", "height": 16, "width": 16, "num_inference_steps": 2,
        "guidance_scale": 5.0, "guidance_rescale": 0.0, "sampler": "DPM++ 2M Karras", "seed": 3,
        "num_candidates": 1}
    assert job.items[-1].filename == "0003-prompt-s3.png"  # no ASCII words in the prompt
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["0000-a-red-circle.png", "0001-a-large-blue-square.png", "0002-two-yellow-triangles.png",
                     "0003-prompt.png"]
    with Image.open(out / "grids" / grids[0]) as grid:
        assert grid.size == (4 * 128, 128 + 30)  # 4 seeds in a row, each cell 128 px + its label
    assert "16 images ok, 0 failed" in capsys.readouterr().out
    assert_complete(job, out)


def test_sweep_example_makes_every_point_and_one_sheet_per_prompt(tmp_path, model, pipe, elsewhere):
    overrides = [f"model={model}", "width=16", "height=16", "steps=[1,2]", f"output={tmp_path / 'sweep'}"]
    job = load_job(EXAMPLES / "sweep.yaml", overrides)
    result = run_job(job, pipeline=pipe)
    assert result.made == 2 * 2 * 4 and result.job.ok == 16
    item = next(i for i in job.items if i.key == "0001-two-yellow-triangles-s42-steps2-sampler-euler-a")
    assert item.request["sampler"] == "Euler a" and item.request["steps"] == 2
    assert np.array_equal(pixels(job.output / item.filename), direct(pipe, item.request))
    sheets = sorted(p.name for p in (job.output / "grids").iterdir())
    assert sheets == ["0000-a-red-circle-to-the-left-of-a-blue-s42.png", "0001-two-yellow-triangles-s42.png"]
    with Image.open(job.output / "grids" / sheets[1]) as grid:
        assert grid.size == (2 * 128, 4 * (128 + 30))  # steps across, samplers down


def test_a_third_axis_gives_one_sheet_per_value(tmp_path, model, pipe, elsewhere):
    overrides = [f"model={model}", "width=16", "height=16", "steps=[1,2]", "guidance=[1,3]",
                 "prompts=[a red circle]", f"output={tmp_path / 'xyz'}"]
    job = load_job(EXAMPLES / "sweep.yaml", overrides)
    run_job(job, pipeline=pipe)
    assert sorted(p.name for p in (job.output / "grids").iterdir()) == [
        "0000-a-red-circle-s42-cfg1.0.png", "0000-a-red-circle-s42-cfg3.0.png"]


def test_jsonl_example_applies_each_line(tmp_path, model, pipe, elsewhere):
    job = load_job(EXAMPLES / "jsonl.yaml", [f"model={model}", "width=16", "height=16", "steps=2",
                                             f"output={tmp_path / 'jsonl'}"])
    result = run_job(job, pipeline=pipe)
    assert result.made == 2 + 3 + 2 + 2 and result.job.failed == 0
    by_item = {}
    for item in job.items:
        by_item.setdefault(item.number, []).append(item.request)
    assert [r["seed"] for r in by_item[1]] == [7, 8, 9] and by_item[1][0]["negative_prompt"] == ""
    assert by_item[2][0]["steps"] == 30 and by_item[2][0]["guidance"] == 7.0
    assert by_item[3][0]["sampler"] == "Euler a" and by_item[3][0]["negative_prompt"] == "blurry"
    request = by_item[2][1]
    assert np.array_equal(pixels(job.output / job.items[6].filename), direct(pipe, request))


def test_diffusers_folder_example_batches_calls_without_changing_images(tmp_path, model, pipe, elsewhere):
    job = load_job(EXAMPLES / "diffusers-folder.yaml", [f"model={model}", "device=cpu", "dtype=float32",
                                                        *TINY, f"output={tmp_path / 'sd'}"])
    assert job.config.batch_size == 4
    result = run_job(job)  # loads the folder the config names
    assert result.made == 4 + 2
    for item in job.items:
        # Same noise per image; batched arithmetic may round differently in the last bit.
        assert np.abs(pixels(job.output / item.filename).astype(int) - direct(pipe, item.request)).max() <= 1


# ----------------------------------------------------------------------------------------- robustness

class FlakyPipeline:
    """The real pipeline, except that prompt "nan" decodes to NaN and prompt "oom" raises out-of-memory."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.latent_factor = pipe.latent_factor

    def __call__(self, prompts, **kwargs):
        if "oom" in prompts:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        output = self.pipe(prompts, **kwargs)
        for k, prompt in enumerate(prompts):
            if prompt == "nan":
                output.images[k][:] = np.nan
        return output


def test_a_failing_image_is_recorded_the_others_go_on_and_a_rerun_retries_it(tmp_path, model, pipe):
    config = write_config(tmp_path, model=str(model), prompts=["a", "nan", "oom", "b"], images_per_prompt=2,
                          batch_size=2, output=str(tmp_path / "out"), width=16, height=16, steps=1)
    job = load_job(config)
    result = run_job(job, pipeline=FlakyPipeline(pipe))
    assert (result.made, result.failed, result.job.ok, result.job.failed) == (4, 4, 4, 4)
    lines = manifest(job.output)
    assert [line["status"] for line in lines] == ["ok", "ok", "failed", "failed", "failed", "failed", "ok", "ok"]
    assert "NaN" in lines[2]["error"] and "out of memory" in lines[4]["error"]
    assert not (job.output / lines[2]["path"]).exists()
    again = run_job(job, pipeline=pipe)  # the same command again: only the failed images are made
    assert (again.made, again.already_done, again.job.ok, again.job.failed) == (4, 4, 8, 0)
    assert_complete(job, job.output)


def test_ctrl_c_stops_after_the_current_image(tmp_path, model, pipe):
    calls = []

    def interrupt_on_third_image(prompts, **kwargs):
        calls.append(prompts)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the third image is being made
        return pipe(prompts, **kwargs)

    interrupt_on_third_image.latent_factor = pipe.latent_factor
    job = load_job(write_config(tmp_path, model=str(model), prompts=["a"], images_per_prompt=6,
                                output=str(tmp_path / "out"), width=16, height=16, steps=1))
    result = run_job(job, pipeline=interrupt_on_third_image)
    assert result.interrupted and result.made == 3 and result.job is None
    assert not (job.output / "manifest.jsonl").exists()  # the job is not finished
    assert sorted(p.name for p in job.output.glob("*.png")) == [item.filename for item in job.items[:3]]
    assert run_job(job, pipeline=pipe).made == 3


def test_a_rerun_repairs_damage_and_remakes_only_what_is_missing_or_changed(tmp_path, model, pipe):
    config = write_config(tmp_path, model=str(model), prompts=["a", "b"], images_per_prompt=3, grid=False,
                          output=str(tmp_path / "out"), width=16, height=16, steps=1)
    job = load_job(config)
    run_job(job, pipeline=pipe)
    reference = {item.key: pixels(job.output / item.filename) for item in job.items}
    truncated, deleted = (job.output / job.items[1].filename), (job.output / job.items[4].filename)
    truncated.write_bytes(truncated.read_bytes()[:-20])  # damaged outside the job
    deleted.unlink()
    (job.output / f".{job.items[2].filename}.tmp").write_bytes(b"\x89PNG half")  # a kill -9 inside save_png
    (job.output / "manifest.rank0.jsonl").write_text('{"key": "0000-a-s0", "sta', encoding="utf-8")
    result = run_job(job, pipeline=pipe)
    assert (result.made, result.already_done) == (2, 4)
    assert_complete(job, job.output)
    assert all(np.array_equal(pixels(job.output / i.filename), reference[i.key]) for i in job.items)
    bigger = load_job(config, ["images_per_prompt=4", "prompts=[a, c]"])
    assert run_job(bigger, pipeline=pipe).made == 1 + 4  # a's new seed, and all of c
    assert [line["key"] for line in manifest(job.output)] == [item.key for item in bigger.items]


def test_a_partial_log_line_is_skipped_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "manifest.rank0.jsonl"
    path.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "sta', encoding="utf-8")
    assert read_lines(path) == [{"key": "a", "status": "ok"}]
    log = ManifestLog(tmp_path, 0)
    log.append({"key": "c", "status": "ok"})
    log.close()
    assert [line["key"] for line in read_lines(path)] == ["a", "c"]
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path, model, pipe):
    """A 48-image job killed with SIGKILL three times, at random moments once it is making images, then run
    to the end: every image once, none corrupt, one ok manifest line each, pixels equal to an uninterrupted run.
    The killed runs are forked from a server that has already imported ldm, so each starts in milliseconds."""
    out = tmp_path / "killed"
    config = write_config(tmp_path, model=str(model), output=str(out), width=16, height=16, steps=2,
                          prompts=["a red circle", "a blue square", "two yellow triangles", "赤い丸"],
                          seeds=list(range(100, 112)))
    job = load_job(config)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ldm.sampling_job"])
    moments = random.Random(0)
    log = out / "manifest.rank0.jsonl"
    for _ in range(3):
        before = len(read_lines(log))
        child = context.Process(target=main, args=(["sample", str(config)],))
        child.start()
        deadline = time.monotonic() + 60
        while len(read_lines(log)) <= before and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(moments.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
    made_before_rerun = sum(1 for item in job.items if (out / item.filename).exists())
    assert 0 < made_before_rerun < len(job.items)  # the kills landed in the middle of the job
    result = run_job(job)
    assert result.made == len(job.items) - result.already_done
    reference = run_job(load_job(config, [f"output={tmp_path / 'uninterrupted'}"]), pipeline=pipe)
    assert reference.made == 48
    for item in job.items:
        assert np.array_equal(pixels(out / item.filename), pixels(tmp_path / "uninterrupted" / item.filename))
    assert_complete(job, out)


# ------------------------------------------------------------------------------------------------ scale-out

def test_two_ranks_make_the_same_images_as_one_process(tmp_path, model, pipe):
    def job_in(name):
        return load_job(write_config(tmp_path, model=str(model), prompts=["a", "b", "c"], seeds=[1, 2, 3],
                                     steps=[1, 2], output=str(tmp_path / name), width=16, height=16))

    single = job_in("single")
    run_job(single, pipeline=pipe)
    split = job_in("split")
    second = run_job(split, pipeline=pipe, world=World(rank=1, size=2))
    assert second.made == 9 and second.job is None  # items 1, 3, 5, ...; rank 0 writes the manifest
    assert not (split.output / "manifest.jsonl").exists()
    first = run_job(split, pipeline=pipe, world=World(rank=0, size=2))
    assert first.made == 9 and first.job.ok == 18
    ranks = [line["rank"] for line in manifest(split.output)]
    assert ranks == [k % 2 for k in range(18)]
    for item in single.items:
        assert np.array_equal(pixels(split.output / item.filename), pixels(single.output / item.filename))
    assert [line["key"] for line in manifest(split.output)] == [line["key"] for line in manifest(single.output)]


def test_torchrun_with_two_cpu_processes_equals_one_process(tmp_path, model):
    config = write_config(tmp_path, model=str(model), prompts=["a red circle", "a blue square"], seeds=[5, 6, 7],
                          output=str(tmp_path / "torchrun"), width=16, height=16, steps=2, device="cpu")
    # Both runs in child processes with one thread each: results depend on the thread count in the last bits.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "ldm.sampling_job", "sample", str(config), f"output={tmp_path / 'one'}"]
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "ldm.sampling_job", "sample", str(config)]
    runs = [subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
            for command in (single, double)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0:" in runs[1].stdout and "rank 1:" in runs[1].stdout and "6 images ok" in runs[1].stdout
    job = load_job(config)
    assert_complete(job, job.output)
    assert {line["rank"] for line in manifest(job.output)} == {0, 1}
    for item in job.items:
        assert np.array_equal(pixels(job.output / item.filename), pixels(tmp_path / "one" / item.filename))


# ------------------------------------------------------------------------------------ info and --from-png

def test_info_prints_the_stored_parameters_and_from_png_remakes_the_image(tmp_path, model, pipe, capsys):
    job = load_job(write_config(tmp_path, model=str(model), prompts=["a red circle"], negative_prompt="blurry",
                                seeds=[42], output=str(tmp_path / "out"), width=16, height=16, steps=2,
                                sampler={"name": "euler_a"}))
    run_job(job, pipeline=pipe)
    png = job.output / job.items[0].filename
    capsys.readouterr()
    assert main(["info", str(png)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, "
                              "Seed: 42, Size: 16x16, Model hash: ")
    assert json.loads(printed[printed.index("{"):])["request"] == job.items[0].request
    assert main(["sample", "--from-png", str(png), "--output", str(tmp_path / "again")]) == 0
    assert "identical pixels" in capsys.readouterr().out
    assert np.array_equal(pixels(tmp_path / "again" / png.name), pixels(png))
    assert main(["sample", "--from-png", str(png), "--output", str(job.output)]) == 2
    assert "would overwrite" in capsys.readouterr().err
