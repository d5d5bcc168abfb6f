"""Running a job: every rank makes the images of its share that are not done, then rank 0 merges the record.

Rank r's share is items r, r + N, r + 2N, ... of the job (N processes): fixed by the plan alone, so no rank needs
to know what the others found on disk, and interleaved, so shares stay balanced when a job resumes. An image
depends only on its request, so the split does not change any image. One image failing (an exception, NaN pixels,
out of memory) is logged and the job goes on; Ctrl-C (or SIGTERM) stops after the current image, a second Ctrl-C
at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from itertools import groupby

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from ldm.loading import load_components
from ldm.metadata import save_png
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling_job.config import ConfigError, JobConfig
from ldm.sampling_job.edits import JobPipelines, call_arguments, input_paths
from ldm.sampling_job.grids import write_grids
from ldm.sampling_job.manifest import ManifestLog, Tally, is_done, line_for, merge, remove_stale_temporaries
from ldm.sampling_job.work import Job, WorkItem

# How long a rank may wait for the others at a collective: ranks finish within an image or two of each other,
# but the default (30 min) could cut off a rank still loading a large model from a slow disk.
COLLECTIVE_TIMEOUT = timedelta(hours=6)
# Request fields that differ between the images of one pipeline call; all others must be equal.
PER_IMAGE = ("prompt", "negative_prompt", "seed")


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        """torchrun's RANK/WORLD_SIZE/LOCAL_RANK; with several processes, a gloo group for the final collective."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        return cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any rank, or when a rank is gone (a barrier too)."""
        if not dist.is_initialized():
            return flag
        value = torch.tensor([int(flag)])
        try:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        except RuntimeError:  # a rank died or was stopped: the job cannot be merged now
            return True
        return bool(value.item())


@dataclass
class RunResult:
    made: int = 0               # images this process made in this run
    failed: int = 0             # images that failed in this process in this run
    already_done: int = 0       # images of this process's share that were done before this run
    seconds: float = 0.0        # the whole run, wall clock
    load_seconds: float = 0.0   # of which loading the model
    interrupted: bool = False   # on any rank
    job: Tally | None = None    # rank 0, unless interrupted: the whole job's record

    @property
    def images_per_second(self) -> float:
        making = self.seconds - self.load_seconds
        return self.made / making if making > 0 else 0.0


def run_job(job: Job, pipeline: LatentDiffusionPipeline | None = None, world: World = World()) -> RunResult:
    """Make the images of this rank's share of `job` that are not done yet; rank 0 then writes manifest.jsonl
    and the grids if the whole job is finished. `pipeline` overrides the config's model (edit items use the
    editing pipelines on its weights)."""
    started = time.perf_counter()
    share = [item for item in job.items if item.request is not None][world.rank::world.size]
    todo = [item for item in share if not is_done(job.output / item.filename, item.request)]
    result = RunResult(already_done=len(share) - len(todo))
    if todo:
        pipes = (load_pipelines(job.config, share, world) if pipeline is None
                 else JobPipelines.around(pipeline, share))
        result.load_seconds = time.perf_counter() - started
        check_sizes(share, pipes.latent_factor)
        _make(job, pipes, todo, world, result, total=len(share))
    result.interrupted = world.any(result.interrupted)  # also waits for every rank to finish
    if world.rank == 0 and not result.interrupted:
        result.job = merge(job)
        if result.job.missing == 0:
            remove_stale_temporaries(job.output)
            if job.config.grid:
                write_grids(job)
    result.seconds = time.perf_counter() - started
    return result


def load_pipelines(config: JobConfig, items: list[WorkItem], world: World) -> JobPipelines:
    """The config's model, once, with the pipeline of each mode `items` need (a ConfigError for one it cannot do)."""
    components = load_components(config.model, config=config.model_config)
    pipes = JobPipelines.build(components, items, config.model)
    return pipes.to(resolve_device(config.device, world), getattr(torch, config.dtype))


def resolve_device(name: str, world: World) -> str:
    """auto: CUDA when present, else the CPU; plain "cuda" under torchrun: this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{world.local_rank}" if name == "cuda" else name


def check_sizes(items: list[WorkItem], factor: int) -> None:
    """Sizes the model cannot make are a config error, found before any image is written."""
    for item in items:
        for name in ("width", "height"):
            value = item.request[name]
            if value is not None and value % factor:
                raise ConfigError(f"{name}={value} must be a multiple of {factor} for this model (its VAE's "
                                  f"downsampling factor), e.g. {factor * max(1, round(value / factor))} "
                                  f"(first found for {item.source})")


# --------------------------------------------------------------------------------------------- the loop

def _make(job: Job, pipes: JobPipelines, items: list[WorkItem], world: World, result: RunResult,
          total: int) -> None:
    log = ManifestLog(job.output, world.rank)
    # Rank 0's bar counts its share: the shares are interleaved, so its ETA is the job's.
    with _stop_requests() as stop, tqdm(total=total, initial=result.already_done, unit="img", desc="sampling",
                                        disable=world.rank != 0) as bar:
        try:
            for batch in _batches(items, job.config.batch_size):
                if stop.requested:
                    result.interrupted = True
                    break
                for item, outcome, seconds in _generate_each(pipes, batch):
                    _record(job, log, item, outcome, seconds, world.rank, result)
                    bar.update()
        finally:
            log.close()


def _batches(items: list[WorkItem], size: int):
    """Runs of consecutive items that one pipeline call can make (equal settings), at most `size` long."""
    shared = lambda item: [value for key, value in item.request.items() if key not in PER_IMAGE]
    for _, run in groupby(items, key=shared):
        run = list(run)
        for start in range(0, len(run), size):
            yield run[start:start + size]


def _generate_each(pipes: JobPipelines, batch: list[WorkItem]):
    """(item, (image, settings) or the exception, seconds) for each item; a failed batch is retried one by one,
    so that one bad image (or an out-of-memory batch) does not take the others with it."""
    started = time.perf_counter()
    try:
        outcomes = _generate(pipes, batch)
    except Exception as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error, give the retry the whole GPU
        if len(batch) > 1:
            for item in batch:
                yield from _generate_each(pipes, [item])
            return
        outcomes = [error]
    seconds = (time.perf_counter() - started) / len(batch)
    for item, outcome in zip(batch, outcomes):
        yield item, outcome, seconds


def _generate(pipes: JobPipelines, batch: list[WorkItem]) -> list:
    requests = [item.request for item in batch]
    first = requests[0]  # a batch shares everything but prompts and seeds: the mode and the input files too
    mode, pipe = pipes.for_request(first)
    output = pipe(
        [r["prompt"] for r in requests], negative_prompt=[r["negative_prompt"] for r in requests],
        generator=[torch.Generator().manual_seed(r["seed"]) for r in requests],  # image k: seed k's own noise
        height=first["height"], width=first["width"], num_inference_steps=first["steps"],
        guidance_scale=first["guidance"], sampler=first["sampler"], output_type="np", **call_arguments(first, mode),
    )
    outcomes = []
    for request, pixels, settings in zip(requests, output.images, output.settings):
        if not np.isfinite(pixels).all():
            outcomes.append(FloatingPointError("the image has NaN or infinite values (float16 overflow? try "
                                               "dtype=float32, or another sampler)"))
            continue
        image = Image.fromarray((pixels * 255).round().astype(np.uint8))  # the pipeline's own "pil" rounding
        # The pipeline cannot name the seed of a generator it was given; it is the request's.
        outcomes.append((image, {**settings, "seed": request["seed"], **input_paths(request), "request": request}))
    return outcomes


def _record(job: Job, log: ManifestLog, item: WorkItem, outcome, seconds: float, rank: int,
            result: RunResult) -> None:
    if not isinstance(outcome, Exception):
        try:
            image, settings = outcome
            save_png(image, job.output / item.filename, settings)
            log.append(line_for(item, "ok", seconds=round(seconds, 4), rank=rank, settings=settings))
            result.made += 1
            return
        except Exception as error:  # a full disk, a read-only folder: this image fails, the job goes on
            outcome = error
    log.append(line_for(item, "failed", seconds=round(seconds, 4), rank=rank,
                        error=f"{type(outcome).__name__}: {outcome}"))
    result.failed += 1


class _StopFlag:
    requested = False


@contextmanager
def _stop_requests():
    """The first Ctrl-C or SIGTERM asks the loop to stop after the current image; a second Ctrl-C stops now.
    (Signal handlers can only be set from the main thread; elsewhere the defaults stay.)"""
    stop = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print("\nstopping after the current image (Ctrl-C again to stop now)", file=sys.stderr)

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
