"""Helpers for the notebooks in notebooks/: settings from the environment, labelled image grids that display inline,
a live preview during sampling, clean interruption, and a record of the UNet's cross-attention.

    nb = notebook_settings()                  # LDM_NOTEBOOK_MODEL, _EDIT_MODEL, _SIZE, ... (see below)
    pipe = LatentDiffusionPipeline.from_pretrained(nb.model)
    show_grid(pipe(["a red circle"] * 4, seed=0).images, labels=["seed 0", "seed 1", "seed 2", "seed 3"])

    preview = LivePreview(LatentPreviewDecoder.fit(pipe.vae, latents), every=2)
    try:
        pipe(prompt, callback=chain(preview, Interrupt(after_steps=10)))
    except StopSampling as stop:
        show_grid(pipe.decoder.decode(stop.info.denoised))   # the x0 estimate where it stopped

    with capture_cross_attention(pipe.unet) as attention:
        pipe(prompt)
    attention.mean()                           # (batch, tokens, h, w): which token each latent pixel reads

Everything here works outside Jupyter too: grids and plots are PIL images, and LivePreview keeps its frames.
IPython and matplotlib (the `notebooks` extra) are imported only by the functions that need them.
"""

from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFont

from ldm.grids import labelled_grid
from ldm.decoders import Decoder
from ldm.models.text_encoders import TextEncoder
from ldm.models.unet import SpatialTransformer
from ldm.prompts import chunk_prompt
from ldm.samplers import Callback, StepInfo

# ------------------------------------------------------------------------------------------------ settings

MODEL_VARIABLE = "LDM_NOTEBOOK_MODEL"    # the embedded model's name, a diffusers folder or a single file
EDIT_MODEL_VARIABLE = "LDM_NOTEBOOK_EDIT_MODEL"        # the instruction-editing model: "shapes-edit", a folder
INPAINT_MODEL_VARIABLE = "LDM_NOTEBOOK_INPAINT_MODEL"  # the inpainting model; unset: LDM_NOTEBOOK_MODEL's
SIZE_VARIABLE = "LDM_NOTEBOOK_SIZE"      # image side in pixels: 64 for the shapes model, 512 for SD 1.x
DEVICE_VARIABLE = "LDM_NOTEBOOK_DEVICE"  # cpu, cuda, mps
QUICK_VARIABLE = "LDM_NOTEBOOK_QUICK"    # 1: the lighter parameters the test suite runs the notebooks with


@dataclass(frozen=True)
class NotebookSettings:
    model: str = "shapes"
    size: int = 64
    device: str = "cpu"
    quick: bool = False
    edit_model: str = "shapes-edit"  # InstructPix2PixPipeline's model (an 8-channel UNet)
    inpaint_model: str | None = None  # InpaintPipeline's model (4 or 9 channels); None: `model`

    def __post_init__(self):
        if self.inpaint_model is None:  # any text-to-image model inpaints by latent blending
            object.__setattr__(self, "inpaint_model", self.model)

    def pick(self, full, quick):
        """`quick` under the test suite's lighter parameter set, else `full`."""
        return quick if self.quick else full


def notebook_settings() -> NotebookSettings:
    """The settings the notebooks run with, read from the environment (defaults: the embedded model on the CPU)."""
    size_text = os.environ.get(SIZE_VARIABLE, "64")
    if not size_text.isdigit() or int(size_text) % 8 or int(size_text) == 0:
        raise ValueError(f"{SIZE_VARIABLE}={size_text!r} must be a positive multiple of 8, e.g. 64 for the shapes "
                         f"model or 512 for Stable Diffusion 1.x")
    quick_text = os.environ.get(QUICK_VARIABLE, "0").strip().lower()
    if quick_text not in ("", "0", "1", "false", "true"):
        raise ValueError(f"{QUICK_VARIABLE}={quick_text!r} must be 1 (lighter parameters) or 0")
    return NotebookSettings(model=os.environ.get(MODEL_VARIABLE, "shapes"), size=int(size_text),
                            device=os.environ.get(DEVICE_VARIABLE, "cpu"), quick=quick_text in ("1", "true"),
                            edit_model=os.environ.get(EDIT_MODEL_VARIABLE, "shapes-edit"),
                            inpaint_model=os.environ.get(INPAINT_MODEL_VARIABLE))


# ------------------------------------------------------------------------------------------------ pictures

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoder output (B, 3, H, W) in [-1, 1] -> PIL images, post-processed as the pipeline does it."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"to_pil takes a decoder's (batch, 3, height, width) output, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    array = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).numpy()]


def show_grid(images, labels: Sequence[str] | None = None, columns: int | None = None,
              cell: int = 128) -> Image.Image:
    """A grid of square cells of `cell` pixels with a label under each; Jupyter displays the returned image inline.

    `images`: PIL images, or a decoder's (B, 3, H, W) output in [-1, 1]. Small images are enlarged pixel by pixel
    (nearest neighbour, so a 64-pixel image shows its pixels), large ones shrunk smoothly. PIL's default font draws
    ASCII only: label Japanese prompts by an English gloss and print the Japanese text.
    """
    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    images = list(images)
    if not images:
        raise ValueError("show_grid needs at least one image")
    labels = [""] * len(images) if labels is None else list(labels)
    if len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images: give one label per image, or none")
    for label in labels:
        if missing := _undrawable(label):
            raise ValueError(f"label {label!r}: PIL's default font cannot draw {missing!r}; write labels in ASCII "
                             "(an English gloss for Japanese text, 'sigma' for σ) and print the text instead")
    columns = columns or min(len(images), 8)
    shrunk = [image if image.width <= cell else image.resize((cell, cell), Image.LANCZOS) for image in images]
    return labelled_grid([image.convert("RGB") for image in shrunk], labels, columns, cell)


def _undrawable(text: str) -> str:
    """The characters of `text` that the font labelled_grid uses would draw as its missing-glyph box."""
    font = ImageFont.load_default()
    box = _glyph(font, "\uffff")  # a non-character: every font draws its missing-glyph box for it
    return "".join(dict.fromkeys(c for c in text if not c.isspace() and _glyph(font, c) == box))


def _glyph(font, character: str) -> tuple:
    mask = font.getmask(character)
    return mask.size, bytes(mask)


def plot_maps(maps, titles: Sequence[str] | None = None, columns: int | None = None, cmap: str = "viridis",
              size: float = 1.6, under: Image.Image | None = None) -> Image.Image:
    """Heat maps (N, h, w) side by side, each on its own colour scale, as a PIL image. `under`: an image to draw
    beneath every map (the maps then half transparent and stretched over it).

    Rendered with matplotlib's Agg canvas rather than pyplot, so a cell shows it exactly once, and it can be saved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = [np.asarray(torch.as_tensor(m, dtype=torch.float32).cpu()) for m in maps]
    if not maps or any(m.ndim != 2 for m in maps):
        raise ValueError("plot_maps takes a non-empty sequence of 2-D maps, e.g. a (N, h, w) tensor")
    if titles is not None and len(titles) != len(maps):
        raise ValueError(f"got {len(titles)} titles for {len(maps)} maps: give one each, or none")
    columns = columns or min(len(maps), 8)
    rows = math.ceil(len(maps) / columns)
    figure = Figure(figsize=(size * columns, size * rows), layout="constrained")
    extent = None if under is None else (0, under.width, under.height, 0)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for index, axis in enumerate(axes):
        axis.set_axis_off()
        if index >= len(maps):
            continue
        if under is not None:
            axis.imshow(under, extent=extent)
        axis.imshow(maps[index], cmap=cmap, extent=extent,
                    interpolation="nearest" if under is None else "bilinear", alpha=None if under is None else 0.6)
        if titles is not None:
            axis.set_title(titles[index], fontsize=9)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return Image.open(buffer).convert("RGB")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors along the arc between them. Two Gaussian draws of one
    size have nearly the same length, and so does every point of the arc (a straight line passes through shorter
    vectors), so each point looks like noise the model knows how to denoise."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    cosine = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1)
    angle = torch.arccos(cosine)
    if angle.abs() < 1e-4:  # (nearly) parallel: the straight line is the arc
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)


# ------------------------------------------------------------------------------------------------ callbacks

class StopSampling(Exception):
    """Raised from a sampling callback to end a pipeline call early; `info` is the last step's StepInfo."""

    def __init__(self, info: StepInfo):
        super().__init__(f"sampling stopped at step {info.i + 1} (sigma {float(info.sigma):.3g})")
        self.info = info


class Interrupt:
    """A callback that stops sampling cleanly by raising StopSampling: after `after_steps` steps, at the first
    step where `when(info)` holds, or at the next step after `request()` (e.g. from a button or another thread).
    Samplers keep no state between calls, so the pipeline is ready for the next call straight away."""

    def __init__(self, after_steps: int | None = None, when: Callable[[StepInfo], bool] | None = None):
        if after_steps is not None and (not isinstance(after_steps, int) or after_steps < 1):
            raise ValueError(f"after_steps={after_steps!r} must be an int >= 1, or None")
        self.after_steps, self.when = after_steps, when
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def __call__(self, info: StepInfo) -> None:
        reached = self.after_steps is not None and info.i + 1 >= self.after_steps
        if self.requested or reached or (self.when is not None and self.when(info)):
            self.requested = False  # one request stops one run
            raise StopSampling(info)


def chain(*callbacks: Callback) -> Callback:
    """One callback that calls each of `callbacks` in order (the pipeline takes one)."""
    def call_all(info: StepInfo) -> None:
        for callback in callbacks:
            callback(info)
    return call_all


@dataclass(frozen=True)
class PreviewFrame:
    step: int                  # 0-based sampling step
    sigma: float               # the noise level the x0 estimate was made at
    images: list[Image.Image]  # one preview per image of the batch


class LivePreview:
    """A callback that decodes every image's current x0 estimate with a cheap decoder every `every` steps.

    In Jupyter it updates one displayed grid in place; everywhere it keeps the latest run's previews in `frames`
    (a run restarts at step 0). `decoder`: e.g. `LatentPreviewDecoder.fit(pipe.vae, latents)`, whose linear map
    costs nothing next to a UNet step, or `pipe.decoder` for the exact but slower picture.
    """

    def __init__(self, decoder: Decoder, every: int = 1, cell: int = 128, display: bool | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an int >= 1 (1 previews every step)")
        self.decoder, self.every, self.cell = decoder, every, cell
        self.display = _in_jupyter() if display is None else display
        self.frames: list[PreviewFrame] = []
        self._handle = None

    def __call__(self, info: StepInfo) -> None:
        if info.i == 0:
            self.frames, self._handle = [], None
        if info.i % self.every:
            return
        with torch.no_grad():
            images = to_pil(self.decoder.decode(info.denoised))
        frame = PreviewFrame(info.i, float(info.sigma), images)
        self.frames.append(frame)
        if self.display:
            label = f"step {frame.step + 1}, sigma {frame.sigma:.3g}"
            self._show(show_grid(images, [label] * len(images), cell=self.cell))

    def filmstrip(self, image: int = 0, columns: int | None = None) -> Image.Image:
        """Image `image` of the batch at every previewed step, labelled by step."""
        if not self.frames:
            raise ValueError("no frames yet: pass this LivePreview as the pipeline's callback and run it")
        labels = [f"step {frame.step + 1}" for frame in self.frames]
        return show_grid([frame.images[image] for frame in self.frames], labels, columns, self.cell)

    def _show(self, grid: Image.Image) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(grid, display_id=True)
        else:
            self._handle.update(grid)


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


# ------------------------------------------------------------------------------------------------ cross-attention

@dataclass
class CrossAttentionMaps:
    """What `capture_cross_attention` recorded, one entry per UNet call (a sampling step; two for Heun-like
    samplers). maps[k][b, j] is the (h, w) map, at the latent's resolution, of how much each latent pixel of
    image b attends to text token j: softmax probabilities averaged over heads and over every cross-attention
    layer (coarse layers upsampled), so at each pixel they sum to 1 over the tokens.
    With classifier-free guidance the UNet's batch is the negative prompts' images, then the prompts' images."""

    maps: list[torch.Tensor] = field(default_factory=list)  # per call: (B, T, h, w) float32 on the CPU
    timesteps: list[float] = field(default_factory=list)    # the UNet timestep of each call

    def stacked(self) -> torch.Tensor:
        """(calls, B, T, h, w)."""
        if not self.maps:
            raise ValueError("nothing was captured: run the pipeline (or the UNet) inside the `with` block")
        return torch.stack(self.maps)

    def mean(self) -> torch.Tensor:
        """(B, T, h, w): the maps averaged over every call."""
        return self.stacked().mean(dim=0)


@contextmanager
def capture_cross_attention(unet: torch.nn.Module) -> Iterator[CrossAttentionMaps]:
    """Record the text cross-attention probabilities of every transformer block (`attn2`) of an ldm UNet.

    Forward hooks recompute the probabilities next to each layer's own computation, which they leave untouched:
    the UNet's outputs are bit-identical with and without capture, whatever the attention backend.
    """
    transformers = [module for module in unet.modules() if isinstance(module, SpatialTransformer)]
    if not transformers:
        raise ValueError("this UNet has no cross-attention layers (no SpatialTransformer modules): capture needs "
                         "an ldm UNet with attention levels, e.g. pipe.unet")
    record = CrossAttentionMaps()
    call: dict = {}  # the UNet call in progress: latent size, sum of layer maps, layer count

    def start_call(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        call.update(size=tuple(x.shape[-2:]), total=None, layers=0)
        record.timesteps.append(float(torch.as_tensor(t).flatten()[0]))

    def end_call(module, args, kwargs, output):
        record.maps.append((call["total"] / call["layers"]).cpu())

    handles = [unet.register_forward_pre_hook(start_call, with_kwargs=True),
               unet.register_forward_hook(end_call, with_kwargs=True)]
    for transformer in transformers:
        grid: dict = {}  # the (h, w) of the feature map this transformer flattens into tokens

        def remember_grid(module, args, grid=grid):
            grid["size"] = tuple(args[0].shape[-2:])

        def add_layer(module, args, kwargs, output, grid=grid):
            x, context = args[0], args[1] if len(args) > 1 else kwargs["context"]
            probabilities = _attention_probabilities(module, x, context)  # (B, N, T)
            batch, _, tokens = probabilities.shape
            maps = probabilities.transpose(1, 2).reshape(batch, tokens, *grid["size"])
            maps = torch.nn.functional.interpolate(maps, size=call["size"], mode="bilinear", antialias=True)
            call["total"] = maps if call["total"] is None else call["total"] + maps
            call["layers"] += 1

        handles.append(transformer.register_forward_pre_hook(remember_grid))
        handles += [block.attn2.register_forward_hook(add_layer, with_kwargs=True)
                    for block in transformer.transformer_blocks]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _attention_probabilities(attention: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of an ldm Attention layer in float32, averaged over heads: (B, N_queries, T)."""
    heads = attention.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, tokens, head_dim)

    q, k = split(attention.to_q(x)), split(attention.to_k(context))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, heads, N, T)
    return scores.softmax(dim=-1).mean(dim=1)


def token_labels(encoder: TextEncoder, prompt: str) -> list[str]:
    """A readable label for each position of the encoder windows a prompt fills (the T axis of the attention
    maps): '<start>', the words, '<end>', then '<pad>'. Japanese characters split over several byte tokens show
    as '\ufffd'. A1111 emphasis and BREAK are read as the pipeline reads them."""
    labels = []
    for chunk in chunk_prompt(encoder, prompt):
        ids, mask = encoder.frame([chunk.ids])
        length = int(mask[0].sum())
        for position, token in enumerate(ids[0].tolist()):
            if position >= length:
                labels.append("<pad>")
            elif position == length - 1:
                labels.append("<end>")
            elif position == 0 and encoder.special.bos is not None:
                labels.append("<start>")
            else:
                labels.append(encoder.tokenizer.decode([token]).strip())
    return labels
