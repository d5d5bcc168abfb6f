import dataclasses

import numpy as np
import pytest
import torch

from ldm import LatentDiffusionPipeline
from conftest import tiny_random_pipeline

PROMPTS = ["a red circle", "a blue square on a black background"]


def run_both(folder, output_type="np", steps=4, **extra):
    """Our pipeline and diffusers' StableDiffusionPipeline, both loaded from `folder`, on the same inputs."""
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    ours.progress_bar = False
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=steps, latents=latents, output_type=output_type,
                  height=16, width=16, negative_prompt=["blurry", "ugly"], **{"guidance_scale": 6.0, **extra})
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


def test_default_size_is_the_unets_sample_size_as_in_diffusers(tiny_sd_folder, tmp_path):
    kind, folder, theirs = tiny_sd_folder
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    ours.progress_bar = False
    expected = theirs("a red circle", num_inference_steps=1, output_type="np").images.shape
    assert ours("a red circle", num_inference_steps=1, output_type="np", seed=0).images.shape == expected
    ours.unet.config = dataclasses.replace(ours.unet.config, sample_size=4)
    ours.save_pretrained(tmp_path / "resaved")
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "resaved")
    assert again("a red circle", num_inference_steps=1, output_type="np", seed=0).images.shape == (1, 8, 8, 3)


def test_guidance_rescale_and_no_guidance_match_diffusers(tiny_sd_folder):
    kind, folder, _ = tiny_sd_folder
    for extra in (dict(guidance_rescale=0.7), dict(guidance_scale=1.0)):
        actual, expected = run_both(folder, output_type="latent", **extra)
        np.testing.assert_allclose(actual, expected, atol=1e-3 * max(1.0, np.abs(expected).max()), rtol=0)


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


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = tiny_random_pipeline()
    pipe.progress_bar = False
    return pipe


def test_image_k_of_a_batch_equals_a_single_run_with_seed_plus_k(tiny_pipe):
    call = dict(num_inference_steps=3, height=16, width=16, output_type="np", sampler="Euler a")
    batch = tiny_pipe("a red circle", num_images_per_prompt=4, seed=10, **call)
    assert batch.seeds == [10, 11, 12, 13]
    for k in range(4):
        single = tiny_pipe("a red circle", seed=10 + k, **call).images
        np.testing.assert_allclose(batch.images[k], single[0], atol=1e-5)
    with_generator = tiny_pipe("a red circle", generator=torch.Generator().manual_seed(12), **call).images
    np.testing.assert_allclose(with_generator[0], batch.images[2], atol=1e-5)


def test_candidates_return_the_separately_drawn_image_the_prompt_fits_best(tiny_pipe):
    from ldm.candidates import CANDIDATE_SEED_STRIDE, prompt_fit

    call = dict(num_inference_steps=3, height=16, width=16, output_type="latent", sampler="Euler a")
    plain = tiny_pipe("a red circle", seed=10, **call).images
    torch.testing.assert_close(tiny_pipe("a red circle", seed=10, num_candidates=1, **call).images, plain,
                               atol=0, rtol=0)
    drawn = torch.cat([tiny_pipe("a red circle", generator=torch.Generator().manual_seed(
        (10 + j * CANDIDATE_SEED_STRIDE) % 2**32), **call).images for j in range(4)])
    torch.testing.assert_close(drawn[:1], plain, atol=0, rtol=0)  # candidate 0 is the plain call's image
    plan = tiny_pipe._plan("Euler a", 3)
    negative, positive = tiny_pipe._encode_pair(["a red circle"], [""], 4)
    fit = prompt_fit(plan.denoiser(tiny_pipe.unet), drawn, 4, [torch.Generator().manual_seed(10)], plan.schedule,
                     positive, negative)
    result = tiny_pipe("a red circle", seed=10, num_candidates=4, **call)
    apart = (drawn - result.images).abs().flatten(1).amax(1)  # batched matmuls round differently: 1e-4 apart
    assert int(apart.argmin()) == int(fit.argmax()) and apart.min() < 1e-3 < apart.max()
    assert result.settings[0]["num_candidates"] == 4
    # image k of a batch with candidates equals a single run with seed + k
    batch = tiny_pipe(["a red circle", "a blue square"], seed=20, num_candidates=3, **call).images
    torch.testing.assert_close(batch[1:], tiny_pipe("a blue square", seed=21, num_candidates=3, **call).images,
                               atol=1e-3, rtol=0)


def test_generators_record_their_seed_only_while_it_regenerates_their_image(tiny_pipe):
    call = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    used = torch.Generator().manual_seed(3)
    torch.randn(1, generator=used)  # drawn from: seed 3 no longer gives what it draws next
    result = tiny_pipe(["x", "y"], generator=[torch.Generator().manual_seed(7), used], **call)
    assert result.seeds == [7, None]
    assert [settings["seed"] for settings in result.settings] == [7, None]
    one = tiny_pipe("x", generator=used, num_images_per_prompt=2, **call)
    assert one.seeds == [None, 4]  # image 1 still draws from a fresh generator seeded 3 + 1
    # a batch of two against one image: the same noise, matmuls blocked differently (1e-6 apart at one thread)
    np.testing.assert_allclose(result.images[0], tiny_pipe("x", seed=7, **call).images[0], atol=1e-5)


def test_output_types(tiny_pipe):
    call = dict(num_inference_steps=2, height=16, width=24, seed=1)
    array = tiny_pipe("x", output_type="np", **call).images
    assert array.shape == (1, 16, 24, 3) and 0 <= array.min() and array.max() <= 1
    tensor = tiny_pipe("x", output_type="pt", **call).images
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-7)
    assert tiny_pipe("x", output_type="latent", **call).images.shape == (1, 4, 8, 12)
    image = tiny_pipe("x", output_type="pil", **call).images[0]
    np.testing.assert_array_equal(np.asarray(image), (array[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=15), "height=15 must be a positive multiple of 2"),
    (dict(width=0), "width=0"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(generator=[torch.Generator()] * 3), "3 generators for 1 images"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), r"latents have shape \(1, 4, 3, 3\)"),
    (dict(sampler="Euler z"), "Euler a"),
    (dict(prompt=[]), "prompt must be"),
    (dict(output_type="jpg"), "output_type"),
    (dict(num_candidates=0), r"num_candidates=0 must be an integer >= 1 \(images drawn per image"),
    (dict(num_candidates=2, latents=torch.zeros(1, 4, 8, 8)), "pass num_candidates=1 with latents"),
])
def test_bad_input_is_a_clear_value_error(tiny_pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", "height": 16, "width": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny_pipe(**kwargs)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    from ldm.errors import UnsafeCheckpointError

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": _RunsCode(marker)},
               tmp_path / "model.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="model.ckpt"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "model.ckpt")
    assert not marker.exists()


def test_missing_path_and_folder_without_index_are_named(tmp_path):
    from ldm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="never downloads"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="model_index.json"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)


def test_png_metadata_regenerates_the_same_image(tiny_sd_folder, tmp_path):
    from PIL import Image

    from ldm.metadata import read_settings, regenerate_kwargs

    kind, folder, _ = tiny_sd_folder
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.progress_bar = False
    result = pipe(["a red circle", "赤い丸"], negative_prompt="blurry", num_inference_steps=3, height=16, width=16,
                  guidance_scale=5.0, seed=7, sampler="DPM++ 2M Karras")
    paths = result.save(tmp_path)
    with Image.open(paths[1]) as png:
        parameters = png.text["parameters"]
    assert parameters.splitlines()[:2] == ["赤い丸", "Negative prompt: blurry"]
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 8, Size: 16x16, Model hash: " in parameters
    settings = read_settings(paths[1])
    assert settings["model_hash"] == pipe.model_hash and len(settings["model_hash"]) == 10
    again = pipe(**regenerate_kwargs(settings)).images[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(paths[1])))
    # The default sampler (the folder's scheduler) is stored as its config, and regenerates too.
    default = pipe("a red circle", num_inference_steps=2, height=16, width=16, seed=1)
    path = default.save(tmp_path, prefix="default")[0]
    again = pipe(**regenerate_kwargs(read_settings(path))).images[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(path)))


def test_reading_settings_from_a_foreign_png_is_a_clear_error(tmp_path):
    from PIL import Image

    from ldm.metadata import read_settings

    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no ldm generation settings"):
        read_settings(tmp_path / "plain.png")


def test_long_prompts_are_chunked_not_cut_and_emphasis_changes_the_image(tiny_pipe):
    call = dict(num_inference_steps=2, height=16, width=16, output_type="np", seed=4, guidance_scale=5.0)
    long_prompt = ", ".join(["a red circle on a black background"] * 20)  # about 160 tokens: three windows
    cut = ", ".join(["a red circle on a black background"] * 9)  # what a 75-token cut would keep, roughly
    assert not np.allclose(tiny_pipe(long_prompt, **call).images, tiny_pipe(cut, **call).images)
    plain = tiny_pipe("a red circle", **call).images
    assert not np.allclose(tiny_pipe("a (red:1.5) circle", **call).images, plain)
    np.testing.assert_array_equal(tiny_pipe("a (red:1.0) circle", **call).images, plain)


def test_the_decoder_is_swappable(tiny_pipe):
    from ldm.decoders import TiledVAEDecoder, VAEDecoder

    call = dict(num_inference_steps=2, height=32, width=32, seed=2)
    latents = tiny_pipe("a red circle", output_type="latent", **call).images
    tiled_decoder = TiledVAEDecoder(tiny_pipe.vae, tile=8, overlap=4)
    try:
        tiny_pipe.decoder = tiled_decoder
        tiled = tiny_pipe("a red circle", output_type="pt", **call).images
    finally:
        tiny_pipe.decoder = VAEDecoder(tiny_pipe.vae)
    with torch.no_grad():
        expected = (tiled_decoder.decode(latents) / 2 + 0.5).clamp(0, 1)
        untiled = (VAEDecoder(tiny_pipe.vae).decode(latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(tiled, expected)
    assert not torch.allclose(tiled, untiled)  # the tiled path really ran


def test_a_models_recommended_settings_fill_what_the_call_leaves_out(tiny_sd_folder, tmp_path):
    """sampling_defaults.json (or a single file's metadata) sets what a call omits; explicit arguments still win;
    without one the call takes diffusers' defaults. The settings survive save_pretrained in both formats."""
    import json

    _, folder, _ = tiny_sd_folder
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert pipe.sampling_defaults == {}
    pipe.progress_bar = False
    diffusers_defaults = pipe("a red circle", height=16, width=16, seed=0, output_type="latent").settings[0]
    assert (diffusers_defaults["num_inference_steps"], diffusers_defaults["guidance_scale"]) == (50, 7.5)
    pipe.sampling_defaults = {"num_inference_steps": 3, "guidance_scale": 2.0}
    pipe.save_pretrained(tmp_path / "folder")
    pipe.save_pretrained(tmp_path / "model.safetensors", format="single_file")
    assert json.loads((tmp_path / "folder" / "sampling_defaults.json").read_text()) == pipe.sampling_defaults
    call = dict(height=16, width=16, seed=4, output_type="np")
    explicit = pipe("a red circle", num_inference_steps=3, guidance_scale=2.0, **call)
    for path in (tmp_path / "folder", tmp_path / "model.safetensors"):
        reloaded = LatentDiffusionPipeline.from_pretrained(path)
        reloaded.progress_bar, reloaded.scheduler = False, pipe.scheduler
        implicit = reloaded("a red circle", **call)
        assert implicit.settings[0]["num_inference_steps"] == 3 and implicit.settings[0]["guidance_scale"] == 2.0
        np.testing.assert_allclose(implicit.images, explicit.images, atol=1e-6)
        assert reloaded("a red circle", guidance_scale=1.0, **call).settings[0]["guidance_scale"] == 1.0


@pytest.mark.parametrize("content, match", [
    ('{"guidance": 5}', "unknown sampling default 'guidance'"),
    ('{"num_inference_steps": 2.5}', "num_inference_steps=2.5 must be an integer"),
    ('[5]', "must be a JSON object"),
])
def test_bad_recommended_settings_are_named(tiny_sd_folder, tmp_path, content, match):
    import shutil

    from ldm.errors import CheckpointError

    _, folder, _ = tiny_sd_folder
    copy = shutil.copytree(folder, tmp_path / "model")
    (copy / "sampling_defaults.json").write_text(content)
    with pytest.raises(CheckpointError, match=match):
        LatentDiffusionPipeline.from_pretrained(copy)
