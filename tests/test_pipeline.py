import numpy as np
import pytest
import torch

from ldm import LatentDiffusionPipeline

PROMPTS = ["a red circle", "a blue square on a black background"]


def run_both(folder, output_type="np", steps=4):
    """Our pipeline and diffusers' StableDiffusionPipeline, both loaded from `folder`, on the same inputs."""
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    ours.progress_bar = False
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=steps, guidance_scale=6.0, latents=latents, output_type=output_type,
                  height=16, width=16, negative_prompt=["blurry", "ugly"])
    expected = theirs(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **common).images
    actual = ours(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **common).images
    return np.asarray(actual), np.asarray(expected)


def test_modules_equal_diffusers_after_loading_its_folder(tiny_sd_folder):
    kind, folder, theirs = tiny_sd_folder
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    x = torch.randn(1, 4, 8, 8)
    tokens = ours.text_encoder.encode(["a red circle"]).tokens
    ids = theirs.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(tokens, theirs.text_encoder(ids)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.unet(x, 500, tokens), theirs.unet(x, 500, tokens).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.vae.decode(x), theirs.vae.decode(x).sample, atol=1e-5, rtol=0)


def test_default_sampler_is_the_folders_scheduler_and_images_match(tiny_sd_folder):
    kind, folder, theirs = tiny_sd_folder
    actual, expected = run_both(folder)
    assert actual.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(actual - expected).max() <= 2e-3


@pytest.mark.parametrize("name, flags", [
    ("DDIMScheduler", {}), ("DDIMScheduler", {"timestep_spacing": "trailing"}), ("PNDMScheduler", {}),
    ("EulerDiscreteScheduler", {}), ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}), ("UniPCMultistepScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}), ("LMSDiscreteScheduler", {}),
])
def test_folders_saved_with_each_scheduler_match_diffusers(tiny_sd_folder, tmp_path, name, flags):
    import diffusers

    if name == "LMSDiscreteScheduler":
        pytest.importorskip("scipy")
    kind, _, theirs = tiny_sd_folder
    theirs.scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config, **flags)
    theirs.save_pretrained(tmp_path)
    # Latents first: the tiny random VAE squashes differences, so the decoded image alone would hide them.
    actual, expected = run_both(tmp_path, output_type="latent")
    np.testing.assert_allclose(actual, expected, atol=1e-3 * max(1.0, np.abs(expected).max()), rtol=0)
    actual, expected = run_both(tmp_path)
    assert np.abs(actual - expected).max() <= 2e-3


def test_save_and_reload_both_formats_give_the_same_image(tiny_sd_folder, tmp_path):
    kind, folder, _ = tiny_sd_folder
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.progress_bar = False
    call = dict(num_inference_steps=2, height=16, width=16, output_type="np", seed=3)
    reference = pipe("a red circle", **call).images
    pipe.save_pretrained(tmp_path / "copy")
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "copy")
    again.progress_bar = False
    np.testing.assert_array_equal(again("a red circle", **call).images, reference)
    pipe.save_pretrained(tmp_path / "model.safetensors", format="single_file")
    single = LatentDiffusionPipeline.from_pretrained(tmp_path / "model.safetensors")
    single.progress_bar = False
    single.scheduler = pipe.scheduler
    np.testing.assert_allclose(single("a red circle", **call).images, reference, atol=1e-6)
