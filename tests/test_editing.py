"""The editing pipelines (ldm.editing) against diffusers' own StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline and StableDiffusionInstructPix2PixPipeline, loaded from the same random-weight folders
that diffusers wrote, called with the same inputs and generators; plus the promises diffusers does not make."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.editing import (
    ImageToImagePipeline, InpaintPipeline, InstructPix2PixPipeline, blur_masks,
)
from ldm.pipeline import LatentDiffusionPipeline
from test_samplers import FakeNet, make_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPTS = ["a red circle", "a blue square on a black background"]
SIZE = (16, 12)  # (width, height) the 17x13 inputs are resized to: the VAE factor of the tiny models is 2


def picture(seed: int = 0, size=(17, 13)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def rectangle_mask(box=(4, 3, 12, 9), size=(17, 13)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(mask)


@lru_cache(maxsize=None)
def loaded(pipeline_class, folder):
    """(pipeline, the scheduler it was built with), loaded once per module: tests set the scheduler they need."""
    pipe = pipeline_class.from_pretrained(folder)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe.progress_bar = False
    return pipe, pipe.scheduler


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_both(theirs_class, ours_class, folder, scheduler=None, seeds=(5, 6), **call):
    """Both pipelines from `folder`, each with the scheduler it built from the folder, or that config read by the
    scheduler class named `scheduler`; one generator per image, seeded `seeds`."""
    import diffusers

    outputs = []
    for pipeline_class in (ours_class, theirs_class):
        pipe, built_with = loaded(pipeline_class, folder)
        pipe.scheduler = getattr(diffusers, scheduler).from_config(built_with.config) if scheduler else built_with
        outputs.append(np.asarray(pipe(generator=generators(seeds), **call).images))
    return outputs


def assert_latents_close(actual, expected):
    np.testing.assert_allclose(actual, expected, atol=1e-3 * max(1.0, np.abs(expected).max()), rtol=0)


# ---------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("scheduler, strength", [
    (None, 0.8), (None, 0.3), (None, 1.0), ("DDIMScheduler", 0.5), ("EulerAncestralDiscreteScheduler", 0.6),
    ("DPMSolverMultistepScheduler", 0.75), ("EulerDiscreteScheduler", 1.0),
])
def test_image_to_image_matches_diffusers(tiny_sd_folder, scheduler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    kind, folder, _ = tiny_sd_folder
    call = dict(prompt=PROMPTS, image=picture(), strength=strength, num_inference_steps=5, guidance_scale=6.0,
                negative_prompt=["blurry", "ugly"], output_type="latent")
    actual, expected = run_both(StableDiffusionImg2ImgPipeline, ImageToImagePipeline, folder, scheduler, **call)
    assert actual.shape == (2, 4, SIZE[1] // 2, SIZE[0] // 2)
    assert_latents_close(actual, expected)


@pytest.mark.parametrize("extra, seeds", [(dict(num_images_per_prompt=2), (5, 6)), (dict(guidance_scale=1.0), (7,))])
def test_image_to_image_images_match_diffusers_per_prompt_and_without_guidance(tiny_sd_folder, extra, seeds):
    from diffusers import StableDiffusionImg2ImgPipeline

    kind, folder, _ = tiny_sd_folder
    call = dict(prompt="a red circle", image=picture(), strength=0.6, num_inference_steps=5, output_type="np",
                negative_prompt="blurry", **extra)
    actual, expected = run_both(StableDiffusionImg2ImgPipeline, ImageToImagePipeline, folder,
                                "EulerAncestralDiscreteScheduler", seeds, **call)
    assert actual.shape == expected.shape == (len(seeds), SIZE[1], SIZE[0], 3)
    assert np.abs(actual - expected).max() <= 2e-3


INPAINT_SCHEDULERS = [None, "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                      "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("scheduler", INPAINT_SCHEDULERS)
@pytest.mark.parametrize("task", ["inpaint", "inpaint-4ch"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_matches_diffusers(tiny_editing_folder, task, scheduler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    folder, _ = tiny_editing_folder(task)
    # One image per prompt: given one image for two, diffusers draws both VAE samples from the first generator.
    call = dict(prompt=PROMPTS, image=[picture(0), picture(1)], mask_image=rectangle_mask(), strength=strength,
                height=SIZE[1], width=SIZE[0], num_inference_steps=5, guidance_scale=6.0,
                negative_prompt=["blurry", "ugly"], output_type="latent")
    actual, expected = run_both(StableDiffusionInpaintPipeline, InpaintPipeline, folder, scheduler, **call)
    assert actual.shape == (2, 4, SIZE[1] // 2, SIZE[0] // 2)
    assert_latents_close(actual, expected)


@pytest.mark.parametrize("scheduler, guidance", [
    (None, dict(guidance_scale=7.5, image_guidance_scale=1.5)),
    ("EulerAncestralDiscreteScheduler", dict(guidance_scale=4.0, image_guidance_scale=1.0)),
    ("DPMSolverMultistepScheduler", dict(guidance_scale=1.0, image_guidance_scale=1.5)),  # guidance off
    ("DDIMScheduler", dict(guidance_scale=5.0, image_guidance_scale=0.5)),  # image scale < 1: off, as diffusers
])
def test_instruct_pix2pix_matches_diffusers(tiny_editing_folder, scheduler, guidance):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    folder, _ = tiny_editing_folder("pix2pix")
    call = dict(prompt=PROMPTS, image=picture(), num_inference_steps=5, negative_prompt=["blurry", "ugly"],
                output_type="latent", **guidance)
    actual, expected = run_both(StableDiffusionInstructPix2PixPipeline, InstructPix2PixPipeline, folder, scheduler,
                                **call)
    assert actual.shape == (2, 4, SIZE[1] // 2, SIZE[0] // 2)
    assert_latents_close(actual, expected)


def test_decoded_images_match_diffusers(tiny_editing_folder):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline

    image = picture()
    cases = [
        (StableDiffusionInpaintPipeline, InpaintPipeline, "inpaint",
         dict(mask_image=rectangle_mask(), strength=0.7, height=SIZE[1], width=SIZE[0], guidance_scale=1.0)),
        (StableDiffusionInstructPix2PixPipeline, InstructPix2PixPipeline, "pix2pix", {}),
    ]
    for theirs, ours, task, extra in cases:
        call = dict(prompt="a red circle", image=image, num_inference_steps=4, output_type="np", **extra)
        actual, expected = run_both(theirs, ours, tiny_editing_folder(task)[0], seeds=(3,), **call)
        assert actual.shape == expected.shape == (1, SIZE[1], SIZE[0], 3)
        assert np.abs(actual - expected).max() <= 2e-3


@pytest.mark.parametrize("task", ["inpaint", "inpaint-4ch"])
def test_blurred_mask_and_padding_crop_match_diffusers(tiny_editing_folder, task):
    """mask_blur is diffusers' mask_processor.blur; padding_mask_crop cuts around the mask, fills the processing size
    and pastes the result back into the original image (PIL output: equal to within one 8-bit level)."""
    from diffusers import StableDiffusionInpaintPipeline

    folder, _ = tiny_editing_folder(task)
    theirs, built_with = loaded(StableDiffusionInpaintPipeline, folder)
    ours, _ = loaded(InpaintPipeline, folder)
    image, mask = picture(size=(24, 20)), rectangle_mask((5, 4, 11, 9), size=(24, 20))
    call = dict(prompt="a red circle", image=image, num_inference_steps=4, height=8, width=12, padding_mask_crop=2)
    theirs.scheduler = ours.scheduler = built_with
    expected = theirs(mask_image=theirs.mask_processor.blur(mask, blur_factor=1), generator=generators([4]),
                      **call).images[0]
    actual = ours(mask_image=mask, mask_blur=1, generator=generators([4]), **call).images[0]
    assert actual.size == expected.size == image.size
    difference = np.abs(np.asarray(actual, dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1 and difference.mean() < 0.05
    outside = np.asarray(theirs.mask_processor.blur(mask, blur_factor=1)) == 0
    np.testing.assert_array_equal(np.asarray(actual)[outside], np.asarray(image)[outside])


def test_image_preparation_and_crop_helpers_equal_diffusers_image_processor():
    from diffusers.image_processor import VaeImageProcessor

    from ldm.editing import crop_region, paste_into, prepare_images, prepare_masks, resize_and_fill

    images, masks = VaeImageProcessor(vae_scale_factor=2), VaeImageProcessor(
        vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    image = picture(size=(17, 13))
    floats = np.asarray(image, dtype=np.float32) / 255
    for given in (image, floats, torch.from_numpy(floats).permute(2, 0, 1)[None],
                  torch.from_numpy(floats).permute(2, 0, 1)[None] * 2 - 1):
        expected = images.preprocess(given, height=12, width=16)
        torch.testing.assert_close(prepare_images([given], 12, 16) * 2 - 1, expected, atol=1e-6, rtol=0)
    mask = rectangle_mask(size=(17, 13))
    for given in (mask, mask.convert("RGB"), mask.convert("1"), np.asarray(mask, dtype=np.float32) / 255):
        expected = masks.preprocess(given, height=12, width=16)
        torch.testing.assert_close((prepare_masks([given], 12, 16) >= 0.5).float(), expected, atol=0, rtol=0)
    rng = np.random.default_rng(0)
    for trial in range(60):  # random boxes, paddings and processing sizes
        width, height = (int(v) for v in rng.integers(8, 40, 2))
        x1, y1 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        box = (x1, y1, int(rng.integers(x1 + 1, width + 1)), int(rng.integers(y1 + 1, height + 1)))
        mask, image = rectangle_mask(box, (width, height)), picture(trial, (width, height))
        w, h, pad = *(2 * int(v) for v in rng.integers(2, 16, 2)), int(rng.integers(0, 8))
        region = crop_region(mask, w, h, pad)
        assert region == images.get_crop_region(mask, w, h, pad=pad)
        np.testing.assert_array_equal(np.asarray(resize_and_fill(image.crop(region), w, h)),
                                      np.asarray(images._resize_and_fill(image.crop(region), w, h)))
        generated = picture(trial + 100, (w, h))
        np.testing.assert_array_equal(np.asarray(paste_into(image, mask, generated, region)),
                                      np.asarray(images.apply_overlay(mask, image, generated, region)))


def test_pndm_restarted_at_strength_equals_diffusers_pndm_loop():
    """diffusers' img2img cuts PNDM's timestep list [t0, t1, t1, t2, ...] and restarts its counter; our plan replays
    that, for every cut, epsilon and v prediction (a fake network, as in test_samplers)."""
    from ldm.diffusers_schedulers import plan_from_scheduler, run

    clean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for prediction in ("epsilon", "v_prediction"):
        for steps, strength in [(10, 0.9), (10, 0.6), (4, 0.5), (4, 0.25), (3, 0.34), (2, 0.5)]:
            scheduler, net = make_scheduler("pndm", prediction), FakeNet()
            scheduler.set_timesteps(steps)
            timesteps = scheduler.timesteps[steps - int(steps * strength):]
            x = scheduler.add_noise(clean, noise, timesteps[:1])
            for t in timesteps:
                x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
            plan = plan_from_scheduler(make_scheduler("pndm", prediction), steps).for_strength(strength)
            ours = FakeNet()
            torch.testing.assert_close(run(plan, plan.denoiser(ours), noise, image_latents=clean), x, atol=1e-4,
                                       rtol=0)
            assert ours.timesteps == pytest.approx(net.timesteps)


# ---------------------------------------------------------------------------------------------------- promises

def test_keep_unmasked_preserves_the_input_exactly_outside_the_mask(tiny_editing_folder):
    pipe, _ = loaded(InpaintPipeline, tiny_editing_folder("inpaint-4ch")[0])
    image, mask = picture(size=SIZE), rectangle_mask((4, 3, 10, 8), size=SIZE)  # no resizing: compare pixels
    call = dict(prompt="a red circle", image=image, mask_image=mask, num_inference_steps=3, seed=1)
    for blur in (0, 2):
        outside = np.asarray(blur_masks([mask], blur)[0]) == 0
        plain = np.asarray(pipe(**call, mask_blur=blur).images[0])
        kept = np.asarray(pipe(**call, mask_blur=blur, keep_unmasked=True).images[0])
        array = pipe(**call, mask_blur=blur, keep_unmasked=True, output_type="np").images[0]
        assert 0 < outside.sum() < outside.size
        assert not np.array_equal(plain[outside], np.asarray(image)[outside])  # the decoder alone changes them
        np.testing.assert_array_equal(kept[outside], np.asarray(image)[outside])
        np.testing.assert_array_equal(array[outside], (np.asarray(image, dtype=np.float32) / 255)[outside])
        if blur == 0:  # a 0/1 mask: inside it the generated pixels are untouched
            np.testing.assert_array_equal(kept[~outside], plain[~outside])


@pytest.mark.parametrize("pipeline_class, task, extra", [
    (ImageToImagePipeline, "img2img", dict(strength=0.7)),
    (InpaintPipeline, "inpaint", dict(mask_image=rectangle_mask(), strength=0.9)),
    (InpaintPipeline, "inpaint-4ch", dict(mask_image=rectangle_mask())),
    (InstructPix2PixPipeline, "pix2pix", {}),
])
def test_image_k_of_a_batch_equals_a_single_run_with_seed_plus_k(tiny_editing_folder, pipeline_class, task, extra):
    pipe, _ = loaded(pipeline_class, tiny_editing_folder(task)[0])
    call = dict(image=picture(), num_inference_steps=3, output_type="latent", sampler="Euler a", **extra)
    batch = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=10, **call)
    assert batch.seeds == [10, 11, 12, 13]
    for k, prompt in enumerate(["a red circle"] * 2 + ["a blue square"] * 2):
        single = pipe(prompt, seed=10 + k, **call).images
        torch.testing.assert_close(batch.images[k:k + 1], single, atol=1e-5, rtol=0)


def test_candidates_return_the_separately_drawn_edit_the_instruction_fits_best(tiny_editing_folder):
    from ldm.candidates import CANDIDATE_SEED_STRIDE, prompt_fit
    from ldm.editing import prepare_images
    from ldm.guidance import WithConcatenatedLatents

    pipe, _ = loaded(InstructPix2PixPipeline, tiny_editing_folder("pix2pix")[0])
    call = dict(image=picture(), num_inference_steps=3, output_type="latent", sampler="Euler a", guidance_scale=3.0)
    plain = pipe("a red circle", seed=10, **call).images
    torch.testing.assert_close(pipe("a red circle", seed=10, num_candidates=1, **call).images, plain, atol=0, rtol=0)
    drawn = torch.cat([pipe("a red circle", generator=torch.Generator().manual_seed(
        (10 + j * CANDIDATE_SEED_STRIDE) % 2**32), **call).images for j in range(4)])
    torch.testing.assert_close(drawn[:1], plain, atol=0, rtol=0)  # candidate 0 is the plain call's image
    # the judge sees the input image's latents next to x_t in both branches
    source = pipe.vae.encode(prepare_images([picture()], 12, 16) * 2 - 1).mode().repeat(4, 1, 1, 1)
    plan = pipe._plan("Euler a", 3)
    negative, positive = pipe._encode_pair(["a red circle"], [""], 4)
    fit = prompt_fit(plan.denoiser(WithConcatenatedLatents(pipe.unet, source)), drawn, 4,
                     [torch.Generator().manual_seed(10)], plan.schedule, positive, negative)
    result = pipe("a red circle", seed=10, num_candidates=4, **call).images
    apart = (drawn - result).abs().flatten(1).amax(1)  # batched matmuls round differently
    assert int(apart.argmin()) == int(fit.argmax()) and apart.min() < 1e-3 < apart.max()
    # image k of a batch with candidates equals a single run with seed + k
    batch = pipe(["a red circle", "a blue square"], seed=20, num_candidates=3, **call).images
    torch.testing.assert_close(batch[1:], pipe("a blue square", seed=21, num_candidates=3, **call).images,
                               atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------- bad input

class CountingCalls:
    """Counts forward calls of the UNet and the VAE while active: bad input must be refused before either runs."""

    def __init__(self, pipe):
        self.calls = 0
        self.handles = [module.register_forward_pre_hook(self.count) for module in (pipe.unet, pipe.vae.encoder)]

    def count(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    return path


BAD_INPAINT_CALLS = [
    (lambda tmp: dict(mask_image=rectangle_mask(size=(16, 12))), "mask_image is 16x12 but image is 17x13"),
    (lambda tmp: dict(mask_image=Image.new("L", (17, 13))), "mask_image is empty"),
    (lambda tmp: dict(mask_image=np.full((13, 17), 0.3, dtype=np.float32)), "mask_image is empty"),
    (lambda tmp: dict(image=not_an_image(tmp)), "notes.png' is not an image file"),
    (lambda tmp: dict(mask_image=tmp / "missing.png"), "mask_image: no such file"),
    (lambda tmp: dict(strength=1.5), r"strength=1.5 must be a number in \(0, 1\]"),
    (lambda tmp: dict(strength=-0.1), "strength=-0.1"),
    (lambda tmp: dict(strength=0), "strength=0 must be"),
    (lambda tmp: dict(strength=0.1), "strength=0.1 keeps no step of 4"),
    (lambda tmp: dict(image=np.full((13, 17, 3), 2.0, dtype=np.float32)), r"values in \[2, 2\]"),
    (lambda tmp: dict(image=np.zeros((13, 17, 4), dtype=np.uint8)), r"must be \(H, W, 3\)"),
    (lambda tmp: dict(image=[picture()] * 3, prompt=PROMPTS), "got 3 images for 2 prompts"),
    (lambda tmp: dict(padding_mask_crop=4, output_type="np"), "needs output_type='pil'"),
    (lambda tmp: dict(mask_blur=-1), "mask_blur=-1"),
    (lambda tmp: dict(height=15), "height=15 must be a positive multiple of 2"),
]


@pytest.mark.parametrize("bad, match", BAD_INPAINT_CALLS)
def test_bad_inpainting_input_is_a_clear_error_before_any_compute(tiny_editing_folder, tmp_path, bad, match):
    pipe, _ = loaded(InpaintPipeline, tiny_editing_folder("inpaint")[0])
    call = {**dict(prompt="a red circle", image=picture(), mask_image=rectangle_mask(), num_inference_steps=4),
            **bad(tmp_path)}
    with CountingCalls(pipe) as counter, pytest.raises(ValueError, match=match):
        pipe(**call)
    assert counter.calls == 0


def test_bad_image_and_instruction_input_is_a_clear_error_before_any_compute(tiny_editing_folder, tmp_path):
    img2img, _ = loaded(ImageToImagePipeline, tiny_editing_folder("img2img")[0])
    pix2pix, _ = loaded(InstructPix2PixPipeline, tiny_editing_folder("pix2pix")[0])
    cases = [
        (img2img, dict(strength=1.01), "strength=1.01"),
        (img2img, dict(image=not_an_image(tmp_path)), "is not an image file"),
        (img2img, dict(image=torch.zeros(1, 4, 12, 16)), r"must be \(3, H, W\) or \(B, 3, H, W\)"),
        (pix2pix, dict(image_guidance_scale=float("nan")), "image_guidance_scale=nan"),
        (pix2pix, dict(image=[picture()] * 2), "got 2 images for 1 prompts"),
        (pix2pix, dict(num_candidates=0), r"num_candidates=0 must be an integer >= 1 \(edits drawn per image"),
    ]
    for pipe, bad, match in cases:
        with CountingCalls(pipe) as counter, pytest.raises(ValueError, match=match):
            pipe(**{**dict(prompt="a red circle", image=picture(), num_inference_steps=4), **bad})
        assert counter.calls == 0


def test_a_unet_of_the_wrong_width_names_the_pipeline_that_fits(tiny_editing_folder):
    from ldm.loading import load_components

    components = {task: load_components(tiny_editing_folder(task)[0]) for task in ("img2img", "inpaint", "pix2pix")}
    cases = [
        (InstructPix2PixPipeline, "img2img", "in_channels 8, but this model's UNet has in_channels=4"),
        (InpaintPipeline, "pix2pix", "in_channels=8: an instruction-editing UNet.*InstructPix2PixPipeline"),
        (ImageToImagePipeline, "inpaint", "in_channels=9: an inpainting UNet.*InpaintPipeline"),
        (LatentDiffusionPipeline, "pix2pix", "InstructPix2PixPipeline"),
    ]
    for pipeline_class, task, match in cases:
        with pytest.raises(ValueError, match=match):
            pipeline_class(components[task])
    pipe = ImageToImagePipeline(components["img2img"])  # a UNet swapped in later is caught at the call
    pipe.unet = components["inpaint"].unet
    with CountingCalls(pipe) as counter, pytest.raises(ValueError, match="in_channels=9"):
        pipe("a red circle", picture(), num_inference_steps=2)
    assert counter.calls == 0


def test_instruction_pipeline_defaults_to_the_embedded_edit_model_and_refuses_a_text_to_image_one():
    assert InstructPix2PixPipeline.from_pretrained().unet.config.in_channels == 8  # shapes-edit
    assert LatentDiffusionPipeline.default_model == "shapes"
    with pytest.raises(ValueError, match="InstructPix2PixPipeline needs a UNet with in_channels 8.*in_channels=4"):
        InstructPix2PixPipeline.from_pretrained("shapes")


# ---------------------------------------------------------------------------------------------------- settings, files

def test_png_settings_name_the_editing_options_and_regenerate_the_image(tiny_editing_folder, tmp_path):
    from ldm.metadata import read_settings, regenerate_kwargs

    inpaint, _ = loaded(InpaintPipeline, tiny_editing_folder("inpaint")[0])
    pix2pix, _ = loaded(InstructPix2PixPipeline, tiny_editing_folder("pix2pix")[0])
    image, mask = picture(size=(24, 20)), rectangle_mask((5, 4, 11, 9), size=(24, 20))
    cases = [
        (inpaint, dict(mask_image=mask), dict(strength=0.9, mask_blur=1, padding_mask_crop=2, height=8, width=12),
         "Denoising strength: 0.9, Mask blur: 1, Inpaint area: Only masked, Masked area padding: 2"),
        (pix2pix, {}, dict(image_guidance_scale=1.25, num_candidates=3),
         "CFG scale: 5.0, Image CFG scale: 1.25, Seed: 7"),
    ]
    for pipe, inputs, options, expected_text in cases:
        result = pipe("a red circle", image=image, num_inference_steps=3, guidance_scale=5.0, seed=7,
                      sampler="Euler a", **inputs, **options)
        path = result.save(tmp_path, prefix=type(pipe).__name__)[0]
        with Image.open(path) as png:
            assert expected_text in png.text["parameters"]
        settings = read_settings(path)
        assert settings["pipeline"] == type(pipe).__name__
        assert {key: settings[key] for key in options} == options
        again = pipe(image=image, **inputs, **regenerate_kwargs(settings)).images[0]
        np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(path)))


@pytest.mark.parametrize("pipeline_class, task, extra", [
    (InpaintPipeline, "inpaint", dict(mask_image=rectangle_mask())), (InstructPix2PixPipeline, "pix2pix", {}),
])
def test_nine_and_eight_channel_models_round_trip_through_a_single_file(tiny_editing_folder, tmp_path,
                                                                        pipeline_class, task, extra):
    pipe, _ = loaded(pipeline_class, tiny_editing_folder(task)[0])
    pipe.save_pretrained(tmp_path / "model.safetensors", format="single_file")
    again = pipeline_class.from_pretrained(tmp_path / "model.safetensors")
    again.progress_bar = False
    again.scheduler = pipe.scheduler  # a single file stores the training schedule, not the sampling options
    assert again.unet.config.in_channels == pipe.unet.config.in_channels
    call = dict(prompt="a red circle", image=picture(), num_inference_steps=2, seed=0, output_type="latent", **extra)
    torch.testing.assert_close(again(**call).images, pipe(**call).images, atol=1e-6, rtol=0)


def test_every_image_form_gives_the_same_edit(tiny_editing_folder, tmp_path):
    pipe, _ = loaded(ImageToImagePipeline, tiny_editing_folder("img2img")[0])
    image = picture(size=SIZE)
    image.save(tmp_path / "input.png")
    array = np.asarray(image)
    tensor = torch.tensor(array).permute(2, 0, 1)[None] / 255
    call = dict(prompt="a red circle", num_inference_steps=2, strength=0.5, seed=3, output_type="latent")
    reference = pipe(image=image, **call).images
    for form in (str(tmp_path / "input.png"), tmp_path / "input.png", array, array / 255, tensor, tensor * 2 - 1,
                 [image]):
        torch.testing.assert_close(pipe(image=form, **call).images, reference, atol=1e-5, rtol=0)
