"""The notebooks in notebooks/ and their helpers (ldm.notebook).

Every notebook is executed top to bottom with nbclient, in a kernel running this interpreter, with the lighter
parameter set (LDM_NOTEBOOK_QUICK=1), against LDM_NOTEBOOK_MODEL when set, else the embedded model when it is
installed, else a tiny random SD-shaped pipeline (which checks the wiring, not the pictures); likewise for the
instruction-editing model (LDM_NOTEBOOK_EDIT_MODEL, "shapes-edit", a tiny random InstructPix2Pix folder).
Committed notebooks must carry no outputs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextConfig

from conftest import randomize, tiny_editing_pipeline, tiny_random_pipeline
from ldm.decoders import LatentPreviewDecoder
from ldm.loading import EMBEDDED_MODELS
from ldm.models.text_encoders import CLIPTextEncoder, clip_tokenizer
from ldm.models.unet import UNet, UNetConfig
from ldm.notebook import (
    Interrupt, LivePreview, NotebookSettings, StopSampling, capture_cross_attention, chain, notebook_settings,
    plot_maps, show_grid, slerp, to_pil, token_labels,
)
from ldm.samplers import sample_euler

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; the slowest cell takes a few seconds under LDM_NOTEBOOK_QUICK


# ------------------------------------------------------------------------------------------------ notebooks

def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_committed_notebook_has_no_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell["execution_count"] is None, f"{path.name} cell {index} has an execution count"
    assert "widgets" not in notebook["metadata"], f"{path.name} stores widget state: clear it before committing"


@pytest.fixture(scope="module")
def notebook_environment(tmp_path_factory):
    """LDM_NOTEBOOK_* for the kernels: the models to run, at their image size, with the lighter parameter set."""
    import os

    environment = {"LDM_NOTEBOOK_QUICK": "1"}
    if "LDM_NOTEBOOK_MODEL" not in os.environ and not (EMBEDDED_MODELS["shapes"] / "model_index.json").is_file():
        folder = tmp_path_factory.mktemp("notebook-model")
        tiny_random_pipeline().save_pretrained(folder)
        environment.update(LDM_NOTEBOOK_MODEL=str(folder), LDM_NOTEBOOK_SIZE="16")  # latent factor 2: 8x8 latents
    if "LDM_NOTEBOOK_EDIT_MODEL" not in os.environ \
            and not (EMBEDDED_MODELS["shapes-edit"] / "model_index.json").is_file():
        folder = tmp_path_factory.mktemp("notebook-edit-model")
        tiny_editing_pipeline("pix2pix").save_pretrained(folder)  # latent factor 2: any multiple of 8 fits
        environment.update(LDM_NOTEBOOK_EDIT_MODEL=str(folder))
    return environment


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernel spec for this very interpreter, so a fresh .venv needs no `ipykernel install` and no global
    Jupyter set-up can pick another Python."""
    from jupyter_client.kernelspec import KernelSpecManager

    folder = tmp_path_factory.mktemp("kernels")
    (folder / "ldm-test").mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "ldm test", "language": "python"}
    (folder / "ldm-test" / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return KernelSpecManager(kernel_dirs=[str(folder)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom(path, notebook_environment, kernel_spec_manager, monkeypatch):
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    for name, value in notebook_environment.items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(path, as_version=4)
    kernel = KernelManager(kernel_name="ldm-test", kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(notebook, km=kernel, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors


# ------------------------------------------------------------------------------------------------ settings, pictures

def test_notebook_settings_read_the_environment(monkeypatch):
    for name in ("LDM_NOTEBOOK_MODEL", "LDM_NOTEBOOK_SIZE", "LDM_NOTEBOOK_DEVICE", "LDM_NOTEBOOK_QUICK"):
        monkeypatch.delenv(name, raising=False)
    defaults = notebook_settings()
    assert (defaults.model, defaults.size, defaults.device, defaults.quick) == ("shapes", 64, "cpu", False)
    assert defaults.pick(20, 4) == 20
    monkeypatch.setenv("LDM_NOTEBOOK_MODEL", "/models/sd15")
    monkeypatch.setenv("LDM_NOTEBOOK_SIZE", "512")
    monkeypatch.setenv("LDM_NOTEBOOK_QUICK", "1")
    custom = notebook_settings()
    assert (custom.model, custom.size, custom.quick, custom.pick(20, 4)) == ("/models/sd15", 512, True, 4)
    monkeypatch.setenv("LDM_NOTEBOOK_SIZE", "100")
    with pytest.raises(ValueError, match="LDM_NOTEBOOK_SIZE='100' must be a positive multiple of 8"):
        notebook_settings()


def test_notebook_settings_read_the_editing_models(monkeypatch):
    for name in ("LDM_NOTEBOOK_MODEL", "LDM_NOTEBOOK_EDIT_MODEL", "LDM_NOTEBOOK_INPAINT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    defaults = notebook_settings()
    assert (defaults.edit_model, defaults.inpaint_model) == ("shapes-edit", "shapes")
    monkeypatch.setenv("LDM_NOTEBOOK_MODEL", "/models/sd15")
    assert notebook_settings().inpaint_model == "/models/sd15"  # unset: the text-to-image model, by blending
    monkeypatch.setenv("LDM_NOTEBOOK_EDIT_MODEL", "/models/instruct-pix2pix")
    monkeypatch.setenv("LDM_NOTEBOOK_INPAINT_MODEL", "/models/sd-inpainting")
    custom = notebook_settings()
    assert (custom.model, custom.edit_model, custom.inpaint_model) == \
        ("/models/sd15", "/models/instruct-pix2pix", "/models/sd-inpainting")
    # Settings built in code, as before the editing models existed, keep their meaning.
    assert NotebookSettings("/models/sd15", 512, "cuda", True) == \
        NotebookSettings("/models/sd15", 512, "cuda", True, "shapes-edit", "/models/sd15")


def test_to_pil_maps_the_decoder_range_to_bytes():
    decoded = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert np.asarray(to_pil(decoded)[0])[0, :, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="decoder's"):
        to_pil(torch.zeros(3, 8, 8))


def test_show_grid_places_each_image_in_its_cell():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = show_grid([Image.new("RGB", (8, 8), colour) for colour in colours], ["r", "g", "b"], columns=2, cell=16)
    label_height = 30  # ldm.grids.labelled_grid's label strip
    assert grid.size == (2 * 16, 2 * (16 + label_height))
    for index, colour in enumerate(colours):
        row, column = divmod(index, 2)
        assert grid.getpixel((column * 16 + 8, row * (16 + label_height) + 8)) == colour


def test_show_grid_rejects_labels_it_cannot_draw():
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="cannot draw '赤い丸'"):
        show_grid([image], ["赤い丸"])
    with pytest.raises(ValueError, match="cannot draw 'σ'"):
        show_grid([image], ["σ 0.5"])
    with pytest.raises(ValueError, match="2 labels for 1 images"):
        show_grid([image], ["a", "b"])


def test_plot_maps_rejects_what_is_not_a_stack_of_maps():
    with pytest.raises(ValueError, match="2-D maps"):
        plot_maps(torch.zeros(4))
    with pytest.raises(ValueError, match="1 titles for 2 maps"):
        plot_maps(torch.zeros(2, 4, 4), ["one"])


def test_slerp_keeps_the_length_of_equal_length_noise():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])  # orthogonal: the arc is a quarter circle
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    middle = slerp(a, b, 0.5)
    assert torch.allclose(middle, (a + b) / math.sqrt(2), atol=1e-6)  # sin(pi/4) / sin(pi/2) of each
    assert math.isclose(middle.norm().item(), 3.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, torch.zeros(3), 0.5)


# ------------------------------------------------------------------------------------------------ callbacks

def gaussian_denoiser(x, sigma):
    """The exact denoiser of N(0, I) data: E[x0 | x0 + sigma * eps = x] = x / (1 + sigma^2)."""
    return x / (1 + sigma**2)


SIGMAS = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])


def test_interrupt_stops_at_the_step_asked_and_leaves_nothing_behind():
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    steps = []
    full = sample_euler(gaussian_denoiser, x, SIGMAS, callback=steps.append)
    with pytest.raises(StopSampling) as stopped:
        sample_euler(gaussian_denoiser, x, SIGMAS, callback=Interrupt(after_steps=3))
    assert stopped.value.info.i == 2 and torch.equal(stopped.value.info.x, steps[2].x)
    assert torch.equal(sample_euler(gaussian_denoiser, x, SIGMAS), full)  # a later run is unaffected


def test_interrupt_on_request_and_on_condition():
    x = torch.ones(1, 1, 2, 2)
    interrupt = Interrupt()
    interrupt.request()
    with pytest.raises(StopSampling) as stopped:
        sample_euler(gaussian_denoiser, x, SIGMAS, callback=interrupt)
    assert stopped.value.info.i == 0
    sample_euler(gaussian_denoiser, x, SIGMAS, callback=interrupt)  # one request stops one run
    with pytest.raises(StopSampling) as stopped:
        sample_euler(gaussian_denoiser, x, SIGMAS, callback=Interrupt(when=lambda info: info.sigma < 3))
    assert float(stopped.value.info.sigma) == 2.0
    with pytest.raises(ValueError, match="after_steps=0"):
        Interrupt(after_steps=0)


def test_live_preview_keeps_a_frame_every_k_steps_of_the_latest_run():
    # One latent channel copied to R, G and B: an x0 guess of 0.5 everywhere previews as (0.5 + 1) / 2 * 255.
    decoder = LatentPreviewDecoder(torch.ones(1, 3), torch.zeros(3))
    preview = LivePreview(decoder, every=2, cell=16, display=False)
    constant_guess = lambda x, sigma: torch.full_like(x, 0.5)
    seen = []
    for _ in range(2):  # the second run replaces the first run's frames
        sample_euler(constant_guess, torch.zeros(1, 1, 4, 4), SIGMAS, callback=chain(preview, seen.append))
    assert [frame.step for frame in preview.frames] == [0, 2, 4] and len(seen) == 10
    assert [frame.sigma for frame in preview.frames] == [10.0, 2.0, 0.5]
    assert (np.asarray(preview.frames[0].images[0]) == 191).all()
    assert preview.filmstrip().size == (3 * 16, 16 + 30)


# ------------------------------------------------------------------------------------------------ cross-attention

@pytest.fixture(scope="module")
def unet():
    config = UNetConfig(in_channels=4, out_channels=4, channels=(32, 64), attention_levels=(True, True), heads=(2, 4),
                        transformer_depth=(1, 1), context_dim=16, norm_groups=8)
    return randomize(UNet(config), std=0.05)


def test_capture_leaves_outputs_unchanged_and_records_distributions(unet):
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 6, generator=generator), torch.randn(2, 5, 16, generator=generator)
    with torch.no_grad():
        plain = unet(x, torch.tensor(500.0), context)
        with capture_cross_attention(unet) as attention:
            captured = unet(x, torch.tensor(500.0), context)
            unet(x, torch.tensor(20.0), context)
        unet(x, torch.tensor(7.0), context)  # after the block: no longer recorded
    assert torch.equal(plain, captured)
    assert attention.timesteps == [500.0, 20.0]
    assert attention.stacked().shape == (2, 2, 5, 8, 6)  # (calls, batch, tokens, latent h, latent w)
    assert torch.allclose(attention.stacked().sum(dim=2), torch.ones(2, 2, 8, 6), atol=1e-5)
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_identical_tokens_share_attention_equally(unet):
    context = torch.randn(1, 1, 16).expand(1, 7, 16)  # 7 copies of one token: the softmax must be uniform
    with torch.no_grad(), capture_cross_attention(unet) as attention:
        unet(torch.randn(1, 4, 8, 8), torch.tensor(300.0), context)
    assert torch.allclose(attention.mean(), torch.full((1, 7, 8, 8), 1 / 7), atol=1e-6)


def test_capture_needs_cross_attention():
    plain = UNet(UNetConfig(channels=(32, 64), attention_levels=(False, False), heads=(2, 4), transformer_depth=(1, 1),
                            norm_groups=8, mid_attention=False))
    with pytest.raises(ValueError, match="no cross-attention layers"), capture_cross_attention(plain):
        pass


def test_token_labels_name_every_position_of_the_windows():
    text_config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=49408, max_position_embeddings=77)
    encoder = CLIPTextEncoder.from_config(text_config, clip_tokenizer())
    expected = ["<start>", "a", "red", "circle", "<end>"] + ["<pad>"] * 72
    assert token_labels(encoder, "a red circle") == expected
    assert token_labels(encoder, "a (red:1.3) circle") == expected  # emphasis changes weights, not tokens
    long = token_labels(encoder, " ".join(["red"] * 80))  # 80 tokens: a second window
    assert len(long) == 154 and long[76:78] == ["<end>", "<start>"]
