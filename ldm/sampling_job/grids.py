"""Contact sheets of a finished job, in <output>/grids/.

Without a sweep: one sheet per prompt item, its seeds side by side. With a sweep: one sheet per prompt item, seed
and Z value, X values across and Y values down. Each cell is labelled; a 1x1 sheet is not written; an image that
failed is a grey cell labelled "failed".
"""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image

from ldm.grids import labelled_grid
from ldm.metadata import save_png
from ldm.sampling_job.manifest import is_done
from ldm.sampling_job.work import Job, WorkItem, slug, value_slug

MAX_COLUMNS = 8  # seeds per row on a sheet without a sweep


def write_grids(job: Job) -> list[Path]:
    written = []
    for name, cells, labels, columns in _sheets(job):
        if len(cells) > 1:
            images = [_image(job.output, item) for item in cells]
            labels = [label if image else f"{label}: failed" for image, label in zip(images, labels)]
            images = [image or Image.new("RGB", (8, 8), "grey") for image in images]
            written.append(save_png(labelled_grid(images, labels, columns), job.output / "grids" / name))
    return written


def _sheets(job: Job):
    """(file name, items, labels, columns) of every sheet, in job order."""
    by_number: dict[int, list[WorkItem]] = {}
    for item in job.items:
        if item.request is not None:
            by_number.setdefault(item.number, []).append(item)
    for number, items in by_number.items():
        stem = f"{number:04d}-{slug(items[0].request['prompt'])}"
        if not job.axes:
            yield f"{stem}.png", items, [f"seed {item.request['seed']}" for item in items], min(len(items), MAX_COLUMNS)
        else:
            yield from _sweep_sheets(job, stem, items)


def _sweep_sheets(job: Job, stem: str, items: list[WorkItem]):
    x, *rest = job.axes
    y_values = rest[0].values if rest else (None,)
    z_axis = rest[1] if len(rest) > 1 else None
    at = {(item.point, item.request["seed"]): item for item in items}
    seeds = list(dict.fromkeys(item.request["seed"] for item in items))
    for seed, z in itertools.product(seeds, z_axis.values if z_axis else (None,)):
        cells, labels = [], []
        for y, x_value in itertools.product(y_values, x.values):
            point = (x_value,) + ((y,) if rest else ()) + ((z,) if z_axis else ())
            cells.append(at[(point, seed)])
            labels.append(", ".join(f"{axis.label} {value}" for axis, value in zip(job.axes[:2], point)))
        z_part = f"-{z_axis.label}{value_slug(z)}" if z_axis else ""
        yield f"{stem}-s{seed}{z_part}.png", cells, labels, len(x.values)


def _image(folder: Path, item: WorkItem) -> Image.Image | None:
    """The item's image, or None where it failed."""
    path = folder / item.filename
    if not is_done(path, item.request):
        return None
    with Image.open(path) as image:
        return image.convert("RGB")
