"""Config-driven batch sampling: `ldm sample CONFIG.yaml [key=value ...]`, resumable and splittable by torchrun.

    ldm sample configs/sample/batch.yaml steps=20 sampler.name=euler_a seeds=[1,2,3]
    ldm sample configs/sample/edit.yaml strength=[0.5,0.8]
    torchrun --nproc-per-node 4 -m ldm sample configs/sample/sweep.yaml
    ldm sample --from-png outputs/sample/0000-a-red-circle-s1.png --output outputs/again
    ldm info outputs/sample/0000-a-red-circle-s1.png

The config (omegaconf YAML plus dotted overrides; fields and defaults in `config.JobConfig`): model, model_config,
device, dtype, sampler {name, schedule}, steps, guidance, guidance_rescale, width, height, prompts, negative_prompt,
seeds | seed + images_per_prompt, output, filename, batch_size, grid, on_bad_line, candidates (images drawn per
image, the one the prompt or instruction fits best kept: text-to-image and instruction editing; None: the model's
recommendation), and for editing image, mask, strength, image_guidance, mask_blur, keep_unmasked.

- Validation comes first. The whole config and every prompt-file line are checked before any model is loaded or
  any file written; sizes the model cannot make are checked once it is loaded, still before any write. An error
  names where (the config, or `prompts.jsonl:4`), the field, the value and what is allowed.
- Sampler names are those of `ldm.samplers.SAMPLER_NAMES`, loosely spelled (`euler_a`, `dpmpp_2m_karras`) and
  stored as A1111's name. `sampler.schedule` (default | karras | exponential) picks that name's variant.
- Prompts: an inline list, a .txt file (one prompt per non-blank line) or a .jsonl file of
  `{"prompt": ..., "negative_prompt": ..., "seeds"/"seed"/"images_per_prompt": ..., "steps": ..., "guidance": ...,
  "guidance_rescale": ..., "width": ..., "height": ..., "sampler": ..., "image": ..., "mask": ..., "strength": ...,
  "image_guidance": ..., "mask_blur": ..., "keep_unmasked": ..., "candidates": ...}`; an item's own fields win over
  the config's (it may not set a field the config sweeps). A line that cannot be read (not UTF-8, not JSON, a bad field)
  stops the job before any work; with `on_bad_line: record` it is recorded as a failed item instead and the rest
  goes on.
- Seeds: `seeds: [...]` lists each image's seed; otherwise image k of a prompt has seed `seed + k`, k <
  images_per_prompt (the pipeline's own rule). An item's seeds/seed/images_per_prompt replace the config's.
- Editing (see `edits`): an item with an `image` is image-to-image, with `image` and `mask` inpainting, and on an
  instruction model (UNet in_channels 8) instruction editing; the pipelines share the model's weights, samplers,
  seeds and metadata with text-to-image. The files are checked while planning, and each request records their
  absolute paths and short sha256, so an image made from an input that has changed since is made again.
- Paths: a relative input path (prompts, image, mask) starts at the folder of the file that names it: the config's
  folder for the config's fields and inline items, a prompt file's folder for its lines. So a config moves with
  its inputs and runs from any folder. A command-line override starts at the current folder, as any path typed
  in a shell; so do output, model and model_config, which every `ldm` command reads the same way.
- Sweeps: a sweepable field (sampler.name, sampler.schedule, steps, guidance, guidance_rescale, width, height,
  negative_prompt, strength, image_guidance) given a list is an axis; axes are X, Y, Z in the order the fields
  appear in the config.
- Work items: prompt item x sweep point x seed, in that order, each named by `filename`
  (default `{item:04d}-{slug}-s{seed}{sweep}{edit}` + ".png", e.g. `0003-a-red-circle-s42-steps20-sampler-euler-a`;
  an edit adds `-from-<image name>-<sha256>[-mask-<sha256>]`); names depend only on the config, the prompt file and
  the input files, and must be unique (checked).
- Each PNG carries A1111 `parameters` and the lossless JSON settings (`ldm.metadata.save_png`, atomic), plus the
  job's `request` for that image (everything that determines it) and an edit's input paths (`image`, `mask`):
  `ldm info` prints them, and `--from-png` re-makes an edit while its inputs are still at those paths.
- Done means: the PNG decodes and holds the same request. The PNGs are the truth; see `manifest` for the log
  (`manifest.rank<R>.jsonl`, fsynced per line) and how `manifest.jsonl` is rebuilt, one line per image, when
  the whole job is resolved. Re-running the same command after a crash or kill -9 makes only what is missing;
  failed images are retried. A config changed between runs remakes exactly the images whose request changed.
- Failures: an exception, NaN pixels or out-of-memory fails that image only (a failed batch is retried image by
  image); the manifest records it and the exit code is 1. Ctrl-C stops after the current image.
- torchrun: RANK/WORLD_SIZE split the job by position (rank r makes items r, r + N, ... that are not done), each
  rank logging to its own manifest part; a gloo group (CPU) waits for every rank at the end, then rank 0 writes
  manifest.jsonl and the grids. The output folder must be shared between nodes. An image depends only on its
  request, so any number of processes makes the same images as one, and a job may resume with another count.
- batch_size > 1 makes several images per pipeline call (same settings only). The noise is the same per image,
  but batched arithmetic can round differently from single images on some devices; batch_size 1 (the default)
  keeps resumed and scaled-out images bit-identical to an uninterrupted single-process run.
- Grids: see `grids`.
"""

from ldm.sampling_job.cli import add_commands, info_command, main, regenerate, sample_command
from ldm.sampling_job.config import ConfigError, JobConfig, load_config
from ldm.sampling_job.runner import RunResult, World, run_job
from ldm.sampling_job.work import Job, WorkItem, load_job

__all__ = [
    "ConfigError", "Job", "JobConfig", "RunResult", "WorkItem", "World", "add_commands", "info_command",
    "load_config", "load_job", "main", "regenerate", "run_job", "sample_command",
]
