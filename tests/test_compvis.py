"""CompVis single-file checkpoints: our key mapping against diffusers' own converters, on tiny random models.

Reference: diffusers' `single_file_utils` converters (CompVis -> diffusers). Exports are checked by feeding them
to those converters; imports by comparing with their output; full-size layouts (built on the meta device, no
memory) by diffusers' own checkpoint-type detection and by the published YAML configs.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as reference
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoints import compvis
from ldm.checkpoints.compvis import CheckpointParts, SingleFileConfig, TextEncoderSpec
from ldm.errors import CheckpointError, StateDictMismatchError, UnknownArchitectureError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL as OurAutoencoder
from ldm.models.text_encoders import OpenCLIPTextConfig, build_open_clip_text_model
from ldm.models.unet import UNet as OurUNet, UNetConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"

# SD1 style: 1x1-conv projections, one head count everywhere; the coarse level has no attention, so its depth
# is the mid block's (2 here, as diffusers reads it).
SD1_UNET = UNetConfig(channels=(32, 64), layers_per_level=2, attention_levels=(True, False), heads=(8, 8),
                      transformer_depth=(1, 2), context_dim=32, norm_groups=8)
# SD2 style: Linear projections, per-level heads; attention on the upsampling level puts its upsampler in slot 2.
SD2_UNET = UNetConfig(channels=(32, 64), layers_per_level=1, attention_levels=(True, True), heads=(2, 4),
                      transformer_depth=(1, 2), context_dim=32, linear_projection=True, norm_groups=8)
TINY_VAE = AutoencoderConfig(channels=(32, 64), layers_per_level=1, norm_groups=8)
TINY_CLIP = {"vocab_size": 99, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 16, "hidden_act": "quick_gelu"}
TINY_OPEN_CLIP = {"width": 128, "heads": 2, "layers": 3, "vocab_size": 99, "context_length": 16, "projection_dim": 48,
                  "activation": "gelu"}
# Tensors a real single file carries beside the models; they must come back untouched.
EXTRAS = {"betas": torch.linspace(1e-4, 2e-2, 10), "model_ema.decay": torch.tensor(0.9999),
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None],
          "cond_stage_model.model.logit_scale": torch.tensor(4.6052)}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # diffusers' deprecation notes, transformers' token-id notes
        yield


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, so a swapped pair (norm1 <-> norm2, q <-> k) cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.1)
    return module.eval()


def diffusers_unet(config: UNetConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=config.channels, layers_per_block=config.layers_per_level,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)),
        attention_head_dim=config.heads, transformer_layers_per_block=config.transformer_depth,
        cross_attention_dim=config.context_dim, use_linear_projection=config.linear_projection,
        norm_num_groups=config.norm_groups,
    )


def diffusers_vae(config: AutoencoderConfig) -> AutoencoderKL:
    levels = len(config.channels)
    return AutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.latent_channels,
        block_out_channels=config.channels, layers_per_block=config.layers_per_level,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=config.norm_groups,
    )


def open_clip_tower(config: dict) -> TextTransformer:
    tower = build_open_clip_text_model(OpenCLIPTextConfig(**config))
    tower.output_tokens = True           # forward returns (pooled, tokens)
    return tower


def text_model(spec: TextEncoderSpec) -> torch.nn.Module:
    return CLIPTextModel(CLIPTextConfig(**spec.config)) if spec.kind == "clip" else open_clip_tower(spec.config)


@dataclasses.dataclass
class Model:
    """A tiny random model in our layout, and its CompVis single file as we write it."""

    parts: CheckpointParts
    single: dict[str, torch.Tensor]


def build(unet: UNetConfig, text: TextEncoderSpec, vae: AutoencoderConfig = TINY_VAE) -> Model:
    config = SingleFileConfig(unet, vae, text)
    parts = CheckpointParts(config, randomized(diffusers_unet(unet)).state_dict(),
                            randomized(diffusers_vae(vae)).state_dict(), randomized(text_model(text)).state_dict())
    return Model(parts, compvis.join_checkpoint(parts))


@pytest.fixture(scope="module")
def sd1() -> Model:
    return build(SD1_UNET, TextEncoderSpec("clip", TINY_CLIP))


@pytest.fixture(scope="module")
def sd2() -> Model:
    return build(SD2_UNET, TextEncoderSpec("open_clip", TINY_OPEN_CLIP, clip_skip=1))


@pytest.fixture(params=["sd1", "sd2"])
def model(request) -> Model:
    return request.getfixturevalue(request.param)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, different[:5]


def reference_unet(single: dict, config: UNetConfig) -> dict:
    return reference.convert_ldm_unet_checkpoint(single, {"layers_per_block": config.layers_per_level})


def reference_vae(single: dict, config: AutoencoderConfig) -> dict:
    types = {"down_block_types": ("DownEncoderBlock2D",) * len(config.channels),
             "up_block_types": ("UpDecoderBlock2D",) * len(config.channels)}
    return reference.convert_ldm_vae_checkpoint(single, types)


def reference_text(single: dict, spec: TextEncoderSpec) -> dict:
    """diffusers' CompVis -> transformers text weights, without the `text_model.` wrapper CLIPTextModel dropped."""
    if spec.kind == "clip":
        converted = reference.convert_ldm_clip_checkpoint(single)
        converted.pop("text_model.embeddings.position_ids", None)    # a buffer, no longer in CLIPTextModel's state
    else:
        clip = CLIPTextModel(CLIPTextConfig(**compvis.clip_text_config_from_open_clip(spec.config)))
        # diffusers, like us, leaves SD2's text_projection out: CLIPTextModel has none
        converted = reference.convert_open_clip_checkpoint(clip, single, prefix=compvis.TEXT_PREFIXES["open_clip"])
    return {key.removeprefix("text_model."): tensor for key, tensor in converted.items()}


def as_transformers_text(parts: CheckpointParts) -> dict:
    if parts.config.text.kind == "clip":
        return parts.text
    return compvis.open_clip_text_to_clip(parts.text)


# ----------------------------------------------------------------------------- against diffusers


def test_export_is_read_back_by_diffusers_converters(model):
    """ours -> CompVis (ours) -> diffusers (theirs) gives back exactly the weights we started from."""
    parts, config = model.parts, model.parts.config
    assert_same_state(reference_unet(model.single, config.unet), parts.unet)
    assert_same_state(reference_vae(model.single, config.vae), parts.vae)
    assert_same_state(reference_text(model.single, config.text), as_transformers_text(parts))


def test_import_matches_diffusers_converters(model):
    single = model.single | EXTRAS
    parts = compvis.split_checkpoint(single)
    config = parts.config
    assert_same_state(parts.unet, reference_unet(single, config.unet))
    assert_same_state(parts.vae, reference_vae(single, config.vae))
    assert_same_state(as_transformers_text(parts), reference_text(single, config.text))


def test_imported_weights_fit_our_models(model):
    parts = compvis.split_checkpoint(model.single)
    OurUNet(parts.config.unet).load_state_dict(parts.unet, strict=True)
    OurAutoencoder(parts.config.vae).load_state_dict(parts.vae, strict=True)
    text_model(parts.config.text).load_state_dict(parts.text, strict=True)


def test_a_partial_config_is_completed_from_the_weights(sd2):
    """A config may fix only the UNet (say, from a YAML of a UNet-only release); the rest is inferred."""
    given = SingleFileConfig(SD2_UNET, vae=None, text=None, prediction_type="v_prediction")
    parts = compvis.split_checkpoint(sd2.single, given)
    assert (parts.config.unet, parts.config.prediction_type) == (SD2_UNET, "v_prediction")
    assert parts.config.vae == compvis.infer_config(sd2.single).vae
    assert_same_state(compvis.join_checkpoint(parts), sd2.single)


def test_ema_weights_are_taken_like_diffusers_takes_them(sd1):
    torch.manual_seed(1)
    ema = {compvis.EMA_PREFIX + key.removeprefix("model.").replace(".", ""): torch.randn_like(tensor)
           for key, tensor in sd1.single.items() if key.startswith(compvis.UNET_PREFIX)}
    single = sd1.single | ema
    expected = reference.convert_ldm_unet_checkpoint(single, {"layers_per_block": 2}, extract_ema=True)
    assert_same_state(compvis.split_checkpoint(single, use_ema=True).unet, expected)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        compvis.split_checkpoint(sd1.single, use_ema=True)


# ----------------------------------------------------------------------------------- round trips


def test_round_trip_is_lossless_both_ways(model):
    back = compvis.split_checkpoint(model.single)
    for name in ("unet", "vae", "text"):
        assert_same_state(getattr(back, name), getattr(model.parts, name))
    single = model.single | EXTRAS
    parts = compvis.split_checkpoint(single)
    assert sorted(parts.extras) == sorted(EXTRAS)              # reported, not converted
    assert_same_state(compvis.join_checkpoint(parts), single)


def test_schedule_buffers_are_written_only_when_given(sd1):
    model_prefixes = (compvis.UNET_PREFIX, compvis.VAE_PREFIX, *compvis.TEXT_PREFIXES.values())
    assert all(key.startswith(model_prefixes) for key in sd1.single)
    with_buffers = dataclasses.replace(sd1.parts, extras={"alphas_cumprod": torch.rand(10)})
    assert "alphas_cumprod" in compvis.join_checkpoint(with_buffers)


def test_vae_attention_is_stored_as_1x1_convs(sd1):
    """CompVis keeps q/k/v/proj_out as Conv2d(1x1); we hold them as Linear."""
    for compvis_name, our_name in {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}.items():
        stored = sd1.single[f"first_stage_model.encoder.mid.attn_1.{compvis_name}.weight"]
        linear = sd1.parts.vae[f"encoder.mid_block.attentions.0.{our_name}.weight"]
        assert stored.shape == (64, 64, 1, 1) and torch.equal(stored[:, :, 0, 0], linear)


# -------------------------------------------------------------------------- full-size layouts


def full_size_single(config: SingleFileConfig) -> dict:
    """A real-size single file with meta tensors: the layout, at no memory cost."""
    with torch.device("meta"):
        parts = CheckpointParts(config, diffusers_unet(config.unet).state_dict(),
                                diffusers_vae(config.vae).state_dict(), text_model(config.text).state_dict())
    return compvis.join_checkpoint(parts)


@pytest.mark.parametrize("yaml_name, model_type", [("v1-inference.yaml", "v1"), ("v2-inference.yaml", "v2")])
def test_full_size_export_is_recognised_by_diffusers(yaml_name, model_type):
    config = compvis.read_yaml_config(CONFIGS / yaml_name)
    single = full_size_single(config)
    assert reference.infer_diffusers_model_type(single) == model_type
    unet_keys = sum(key.startswith(compvis.UNET_PREFIX) for key in single)
    assert unet_keys == 686                                  # as in every SD1.x / SD2.x release
    assert sum(key.startswith(compvis.VAE_PREFIX) for key in single) == 248


# Key names of the released SD1.x / SD2.x files that a wrong block count or slot would move.
RELEASE_KEYS = {
    "v1-inference.yaml": [
        "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight", "model.diffusion_model.middle_block.2.out_layers.3.bias",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.encoder.down.3.block.1.conv2.weight", "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.bias",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
    ],
    "v2-inference.yaml": [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.output_blocks.8.2.conv.weight",
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", "cond_stage_model.model.text_projection",
        "cond_stage_model.model.positional_embedding", "cond_stage_model.model.ln_final.weight",
    ],
}


@pytest.mark.parametrize("yaml_name", sorted(RELEASE_KEYS))
def test_full_size_export_has_the_release_key_names(yaml_name):
    single = full_size_single(compvis.read_yaml_config(CONFIGS / yaml_name))
    assert [key for key in RELEASE_KEYS[yaml_name] if key not in single] == []
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in single


@pytest.mark.parametrize("yaml_name", ["v1-inference.yaml", "v2-inference.yaml"])
def test_inference_follows_the_published_configs(yaml_name):
    """Heads are not in the weights: SD's convention must give what the YAML says (SD1: 8, SD2: 64-wide)."""
    config = compvis.read_yaml_config(CONFIGS / yaml_name)
    inferred = compvis.infer_config(full_size_single(config))
    assert (inferred.unet, inferred.vae, inferred.text) == (config.unet, config.vae, config.text)


# ----------------------------------------------------------------------------- config inference


@pytest.mark.parametrize("unet", [SD1_UNET, SD2_UNET], ids=["sd1", "sd2"])
def test_inference_recovers_what_the_weights_say(unet):
    model = build(unet, TextEncoderSpec("clip", TINY_CLIP))
    inferred = compvis.infer_config(model.single)
    # norm groups and heads are not in the weights; they take SD's values (32 groups, 8 heads for non-1024 text)
    assert inferred.unet == dataclasses.replace(unet, norm_groups=32, heads=(8, 8))
    assert inferred.vae == dataclasses.replace(TINY_VAE, norm_groups=32)
    assert inferred.text == TextEncoderSpec("clip", TINY_CLIP)
    assert inferred.prediction_type == "epsilon"


def test_open_clip_inference_builds_the_same_tower(sd2):
    spec = compvis.infer_config(sd2.single).text
    assert spec == TextEncoderSpec("open_clip", TINY_OPEN_CLIP, clip_skip=1)
    rebuilt = open_clip_tower(spec.config).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd2.parts.text.items()}


# ----------------------------------------------------------------------- open_clip <-> transformers


def test_open_clip_and_converted_transformers_model_give_the_same_tokens():
    tower = randomized(open_clip_tower(TINY_OPEN_CLIP))
    ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    captured = {}
    tower.transformer.resblocks[-2].register_forward_hook(lambda module, args, out: captured.update(penult=out))
    with torch.no_grad():
        _, tokens = tower(ids)
        penultimate = tower.ln_final(captured["penult"])
        for layers, expected in ((3, tokens), (2, penultimate)):       # all layers; SD2's penultimate
            state = compvis.open_clip_text_to_clip(tower.state_dict(), num_layers=layers)
            clip = CLIPTextModel(CLIPTextConfig(**compvis.clip_text_config_from_open_clip(TINY_OPEN_CLIP, layers)))
            clip.load_state_dict(state, strict=True)
            torch.testing.assert_close(clip.eval()(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_open_clip_transformers_round_trip_is_lossless(sd2):
    state = sd2.parts.text
    clip_state = compvis.open_clip_text_to_clip(state)
    assert_same_state(compvis.clip_text_to_open_clip(clip_state, state["text_projection"]), state)
    wrapped = {"text_model." + key: tensor for key, tensor in clip_state.items()}    # older transformers' names
    assert_same_state(compvis.clip_text_to_open_clip(wrapped, state["text_projection"]), state)


def test_open_clip_layer_count_is_checked(sd2):
    with pytest.raises(ValueError, match="num_layers=4 but the text tower has 3 layers"):
        compvis.open_clip_text_to_clip(sd2.parts.text, num_layers=4)


# ---------------------------------------------------------------------------------------- YAML


def published(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", ["v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml"])
def test_yaml_reads_like_diffusers_reads_it(name):
    config = compvis.read_yaml_config(CONFIGS / name)
    theirs = reference.create_unet_diffusers_config_from_ldm(published(name), {}, image_size=512)
    unet = config.unet
    assert list(theirs["block_out_channels"]) == list(unet.channels)
    assert theirs["layers_per_block"] == unet.layers_per_level
    assert theirs["cross_attention_dim"] == unet.context_dim
    assert theirs["use_linear_projection"] == unet.linear_projection
    heads = theirs["attention_head_dim"]                       # diffusers' name for the head count
    assert (tuple(heads) if isinstance(heads, list) else (heads,) * 4) == unet.heads
    assert theirs["down_block_types"] == [("CrossAttnDownBlock2D" if a else "DownBlock2D")
                                          for a in unet.attention_levels]
    vae = reference.create_vae_diffusers_config_from_ldm(published(name), {}, image_size=512)
    assert (tuple(vae["block_out_channels"]), vae["latent_channels"], vae["scaling_factor"]) == (
        config.vae.channels, config.vae.latent_channels, config.vae.scaling_factor)


def test_yaml_values_that_weights_cannot_tell():
    v1, v2, v2v = (compvis.read_yaml_config(CONFIGS / name)
                   for name in ("v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml"))
    assert v1.unet == UNetConfig() and v1.vae == AutoencoderConfig()          # our defaults are SD1's
    assert (v1.prediction_type, v2.prediction_type, v2v.prediction_type) == ("epsilon", "epsilon", "v_prediction")
    assert v2.unet.heads == (5, 10, 20, 20) and v2v.unet == v2.unet
    assert (v1.text.kind, v1.text.clip_skip, v2.text.kind, v2.text.clip_skip) == ("clip", 0, "open_clip", 1)
    assert v1.schedule == compvis.NoiseSchedule("scaled_linear", 0.00085, 0.012, 1000) == v2v.schedule


@pytest.mark.parametrize("name", ["v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml"])
def test_yaml_round_trip(name, tmp_path):
    config = compvis.read_yaml_config(CONFIGS / name)
    compvis.write_yaml_config(config, tmp_path / "out.yaml")
    assert compvis.read_yaml_config(tmp_path / "out.yaml") == config
    ours = reference.create_unet_diffusers_config_from_ldm(yaml.safe_load((tmp_path / "out.yaml").read_text()), {},
                                                           image_size=512)
    assert ours == reference.create_unet_diffusers_config_from_ldm(published(name), {}, image_size=512)


def test_yaml_writer_refuses_what_compvis_cannot_express(tmp_path):
    config = compvis.read_yaml_config(CONFIGS / "v1-inference.yaml")
    odd = dataclasses.replace(config, unet=dataclasses.replace(config.unet, norm_groups=8))
    with pytest.raises(ValueError, match="norm_groups"):
        compvis.write_yaml_config(odd, tmp_path / "odd.yaml")


def yaml_with(tmp_path, old: str, new: str) -> Path:
    path = tmp_path / "edited.yaml"
    path.write_text((CONFIGS / "v1-inference.yaml").read_text().replace(old, new))
    return path


def test_yaml_with_an_unknown_target_is_refused(tmp_path):
    path = yaml_with(tmp_path, "ldm.modules.diffusionmodules.openaimodel.UNetModel", "evil.module.Payload")
    with pytest.raises(ValueError, match=r"unet_config.target is 'evil.module.Payload'.*UNetModel"):
        compvis.read_yaml_config(path)


def test_yaml_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    payload = f"scale_factor: !!python/object/apply:os.system ['touch {marker}']"
    path = yaml_with(tmp_path, "scale_factor: 0.18215", payload)
    with pytest.raises(ValueError, match="not plain YAML"):
        compvis.read_yaml_config(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------- errors


def test_unknown_layout_names_what_was_expected():
    with pytest.raises(UnknownArchitectureError, match=r"model\.diffusion_model\..*first_stage_model\."):
        compvis.split_checkpoint({"foo.bar": torch.zeros(1), "baz": torch.zeros(2)})
    with pytest.raises(UnknownArchitectureError, match="SDXL"):
        compvis.split_checkpoint({"conditioner.embedders.0.transformer.x": torch.zeros(1)})


def test_stray_unet_key_is_reported(sd1):
    single = sd1.single | {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError, match="model.diffusion_model.label_emb.0.0.weight"):
        compvis.split_checkpoint(single)


def test_config_that_does_not_fit_the_weights_is_reported(sd1):
    wrong = dataclasses.replace(sd1.parts.config, unet=dataclasses.replace(SD1_UNET, attention_levels=(True, True)))
    with pytest.raises(StateDictMismatchError, match="missing keys"):
        compvis.split_checkpoint(sd1.single, wrong)


def test_text_layout_must_match_its_kind(sd1):
    wrong_kind = dataclasses.replace(sd1.parts.config, text=TextEncoderSpec("open_clip", TINY_OPEN_CLIP))
    with pytest.raises(ValueError, match="not in the open_clip text tower layout"):
        compvis.join_checkpoint(dataclasses.replace(sd1.parts, config=wrong_kind))
