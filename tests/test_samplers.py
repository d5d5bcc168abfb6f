"""Samplers, the denoiser adapter and the diffusers interop, checked against diffusers' own denoising loop on a
deterministic fake network (same latents, same generators) and against closed forms."""

from __future__ import annotations

import inspect

import pytest
import torch

from ldm.denoisers import DiscreteTimeDenoiser
from ldm.diffusers_schedulers import (
    SCHEDULER_DEFAULTS,
    STABLE_DIFFUSION_CONFIG,
    plan_for,
    plan_from_config,
    plan_from_scheduler,
    run,
)
from ldm.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    TorchNoise,
    lms_coefficient,
    resolve_sampler_name,
    sample_ddim,
    sample_euler,
    sample_euler_ancestral,
)
from ldm.schedules import NoiseSchedule, sampling_sigmas

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (2, 4, 8, 8)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class FakeNet:
    """prediction = tanh(a * x_t + b * t / 1000), a and b fixed random tensors; records every timestep it sees."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(1, 4, 8, 8, generator=generator) * 0.5 + 1.0
        self.b = torch.randn(1, 4, 8, 8, generator=generator)
        self.timesteps: list[float] = []

    def __call__(self, x_t, t, **cond):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        self.timesteps.append(t[0].item())
        return torch.tanh(self.a * x_t + self.b * t.reshape(-1, 1, 1, 1) / 1000)


def initial_latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(SHAPE[0])]


def diffusers_loop(scheduler, net, latents, num_steps, **step_kwargs):
    """diffusers' pipeline loop: init_noise_sigma, scale_model_input, step(...).prev_sample."""
    scheduler.set_timesteps(num_steps)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators()
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def our_loop(scheduler, net, latents, num_steps, **options):
    plan = plan_from_scheduler(scheduler, num_steps, **options)
    return run(plan, plan.denoiser(net), latents, noise=TorchNoise(latents.shape, generators()))


# The schedulers diffusers users swap in, with Stable Diffusion's betas.
SCHEDULERS = {
    "ddim-leading": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "ddim-trailing": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")),
    "ddim-eta-clip": ("DDIMScheduler", dict(clip_sample=True, steps_offset=1)),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1)),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "euler-leading": ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2-karras": ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True)),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "dpmpp-2m-sde-karras": (
        "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", dict(clip_sample=False)),
    "lcm": ("LCMScheduler", {}),
}


def make_scheduler(name: str, prediction_type: str):
    scheduler, flags = SCHEDULERS[name]
    if scheduler == "LMSDiscreteScheduler":
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    return getattr(diffusers, scheduler)(**SD_BETAS, prediction_type=prediction_type, **flags)


@pytest.mark.parametrize("num_steps", [4, 10])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_final_latents_and_timesteps_match_diffusers(name, prediction_type, num_steps):
    step_options = {"eta": 0.6} if name == "ddim-eta-clip" else {}
    reference_net, our_net = FakeNet(), FakeNet()
    latents = initial_latents()
    expected = diffusers_loop(make_scheduler(name, prediction_type), reference_net, latents, num_steps, **step_options)
    ours = our_loop(make_scheduler(name, prediction_type), our_net, latents, num_steps, **step_options)
    assert (ours - expected).abs().max().item() <= 1e-4
    # no extra network evaluations, and the network sees diffusers' timesteps (KDPM2 midpoints to float32 rounding)
    assert len(our_net.timesteps) == len(reference_net.timesteps)
    seen, expected_seen = torch.tensor(our_net.timesteps), torch.tensor(reference_net.timesteps)
    torch.testing.assert_close(seen, expected_seen, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["euler", "ddim-leading", "dpmpp-2m-karras", "heun"])
def test_img2img_matches_diffusers(name):
    num_steps, strength = 10, 0.6
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    noise = initial_latents()
    scheduler, net = make_scheduler(name, "epsilon"), FakeNet()
    scheduler.set_timesteps(num_steps)
    start = num_steps - int(num_steps * strength)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    x = scheduler.add_noise(clean, noise, timesteps[:1])
    for t in timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    plan = plan_from_scheduler(make_scheduler(name, "epsilon"), num_steps).for_strength(strength)
    ours = run(plan, plan.denoiser(FakeNet()), noise, image_latents=clean)
    assert (ours - x).abs().max().item() <= 1e-4


def test_an_image_keeps_its_noise_in_any_batch():
    plan = plan_for("Euler a", 6)
    latents, batch_generators = initial_latents(), generators()
    batch = run(plan, plan.denoiser(FakeNet()), latents, noise=TorchNoise(SHAPE, batch_generators))
    alone = run(plan, plan.denoiser(FakeNet()), latents[1:], noise=TorchNoise((1, *SHAPE[1:]), [generators()[1]]))
    torch.testing.assert_close(alone, batch[1:], atol=1e-6, rtol=0)


def constant_denoiser(value: torch.Tensor):
    return lambda x, sigma, **kwargs: value.expand_as(x)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_lands_on_a_constant_x0(sampler):
    """D(x, sigma) = c for all x: every step moves towards c and the last step onto sigma = 0 lands exactly on it."""
    target = torch.linspace(-1, 1, 4).reshape(1, 4, 1, 1).expand(SHAPE)
    sigmas = sampling_sigmas(NoiseSchedule.stable_diffusion(), 5, sigma_kind="karras").sigmas
    x = initial_latents() * sigmas[0]
    out = SAMPLERS[sampler](constant_denoiser(target), x, sigmas, noise=TorchNoise(SHAPE, generators()))
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_ddim_without_noise_is_euler():
    sigmas = sampling_sigmas(NoiseSchedule.stable_diffusion(), 7, layout="ddim").sigmas
    denoiser = DiscreteTimeDenoiser(FakeNet(), NoiseSchedule.stable_diffusion())
    x = initial_latents() * sigmas[0]
    torch.testing.assert_close(sample_ddim(denoiser, x, sigmas), sample_euler(denoiser, x, sigmas), atol=1e-5, rtol=0)


def test_lms_weights_integrate_the_step():
    """The Lagrange basis sums to 1, so the weights of any order sum to the step length."""
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.1, 0.4, 0.0], dtype=torch.float64).numpy()
    for order in range(1, 5):
        total = sum(lms_coefficient(sigmas, 3, j, order) for j in range(order))
        assert total == pytest.approx(sigmas[4] - sigmas[3], rel=1e-12)


def test_callback_sees_every_step():
    plan = plan_for("DPM++ 2M Karras", 5)
    seen = []
    run(plan, plan.denoiser(FakeNet()), initial_latents(), callback=seen.append)
    assert [info.i for info in seen] == list(range(5))
    assert torch.equal(torch.stack([info.sigma for info in seen]), plan.sigmas[:-1])
    assert all(info.denoised.shape == SHAPE for info in seen)


def test_samplers_that_add_noise_ask_for_a_noise_source():
    sigmas = sampling_sigmas(NoiseSchedule.stable_diffusion(), 3).sigmas
    with pytest.raises(ValueError, match="noise=TorchNoise"):
        sample_euler_ancestral(constant_denoiser(torch.zeros(SHAPE)), initial_latents(), sigmas)


# ---- names and configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, scheduler, flags",
    [
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
        ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
        ("sample_dpmpp_2m", "DPMSolverMultistepScheduler", {}),
        ("Euler a", "EulerAncestralDiscreteScheduler", {}),
        ("euler A", "EulerAncestralDiscreteScheduler", {}),
        ("PLMS", "PNDMScheduler", dict(skip_prk_steps=True)),
        ("DDIM", "DDIMScheduler", {}),
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
    ],
)
def test_names_mean_the_diffusers_scheduler_from_config(name, scheduler, flags):
    """A name on a model's config plans exactly what `<Scheduler>.from_config(config, **flags)` would run."""
    base = diffusers.PNDMScheduler.from_config(STABLE_DIFFUSION_CONFIG).config  # a live config, defaults marked
    expected = plan_from_scheduler(getattr(diffusers, scheduler).from_config(base, **flags), 8)
    ours = plan_for(name, 8, base_config=base)
    assert ours.sampler is expected.sampler
    assert torch.equal(ours.sigmas, expected.sigmas) and torch.equal(ours.timesteps, expected.timesteps)
    assert ours.input_scale == expected.input_scale and ours.output_scale == expected.output_scale
    assert ours.options.keys() == expected.options.keys()


def test_unknown_sampler_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M Karras") as error:
        resolve_sampler_name("DPM++ 9M")
    assert "'DPM++ 9M'" in str(error.value)
    assert len(SAMPLER_NAMES) > 40


@pytest.mark.parametrize(
    "config, message",
    [
        ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding"),
        ({"_class_name": "PNDMScheduler"}, "skip_prk_steps"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order=3"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "FlowMatchEulerDiscreteScheduler"),
        ({"beta_schedule": "linear"}, "_class_name"),
    ],
)
def test_unsupported_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        plan_from_config(config, 10)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_DEFAULTS))
def test_config_defaults_are_diffusers_defaults(scheduler):
    module_name = {
        "DPMSolverSDEScheduler": "scheduling_dpmsolver_sde", "LMSDiscreteScheduler": "scheduling_lms_discrete"
    }
    if scheduler in module_name:  # behind optional dependencies at the top level: read the class from its module
        module = pytest.importorskip(f"diffusers.schedulers.{module_name[scheduler]}", exc_type=ImportError)
        cls = getattr(module, scheduler)
    else:
        cls = getattr(diffusers, scheduler)
    parameters = inspect.signature(cls.__init__).parameters
    assert {key: parameters[key].default for key in SCHEDULER_DEFAULTS[scheduler]} == SCHEDULER_DEFAULTS[scheduler]


# ---- the denoiser adapter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0_from_an_exact_network(prediction_type):
    """A network that returns the true eps / v / x0 of x = x0 + sigma * eps must give back x0."""
    schedule = NoiseSchedule.stable_diffusion()
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    sigma = schedule.sigmas[600]
    x = x0 + sigma * eps
    alpha, sigma_vp = 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5
    truth = {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}[prediction_type]
    seen = {}

    def net(x_t, t):
        seen.update(x_t=x_t, t=t)
        return truth

    torch.testing.assert_close(DiscreteTimeDenoiser(net, schedule, prediction_type)(x, sigma), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["x_t"], x * alpha)  # c_in = 1 / sqrt(sigma^2 + 1)
    torch.testing.assert_close(seen["t"], torch.full((SHAPE[0],), 600.0), atol=1e-3, rtol=0)


def test_denoiser_runs_the_network_in_its_dtype():
    class HalfNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x_t, t):
            assert x_t.dtype == torch.bfloat16 and t.dtype == torch.float32
            return x_t * self.scale

    denoiser = DiscreteTimeDenoiser(HalfNet(), NoiseSchedule.stable_diffusion(), "sample")
    out = denoiser(torch.randn(SHAPE), torch.tensor(3.0), timestep=torch.tensor(500.0))
    assert out.dtype == torch.float32


def test_denoiser_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        DiscreteTimeDenoiser(FakeNet(), NoiseSchedule.stable_diffusion(), "flow")
