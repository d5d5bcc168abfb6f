"""The trainer: closed-form diffusion targets, exact resume, DDP == gradient accumulation, exports diffusers reads."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ldm.data.edits import CATEGORIES as EDIT_CATEGORIES
from ldm.data.shapes import RELATIONS, EnglishTranslation, OppositeRelation, RelationTokenLabels, ShapesDataset
from ldm.edit_evaluation import evaluate_edit_model
from ldm.evaluation import CATEGORIES, evaluate_model
from ldm.loading import load_components
from ldm.models.text_encoders import CLIPTextEncoder, clip_tokenizer, compact_clip_tokenizer, load_tokenizer
from ldm.models.unet import UNet, UNetConfig
from ldm.schedules import NoiseSchedule
from ldm.training.objectives import (
    CaptionConsistency, CaptionContrast, ChangedRegion, TextToImageObjective, TokenClassifier,
)
from ldm.training.stages import (
    contradicting_captions, dataclass_from, instantiate, load_config, token_labels, train, transfer_vocabulary,
    widen_input,
)
from ldm.training.loop import TrainSettings

REPO = Path(__file__).resolve().parents[1]

TINY_AUTOENCODER = {
    "task": "autoencoder",
    "data": {"target": "ldm.data.shapes.ShapesDataset", "params": {"length": 64, "size": 16, "seed": 0}},
    "autoencoder": {"channels": [8, 16], "layers_per_level": 1, "latent_channels": 4, "norm_groups": 4,
                    "mid_attention": False},
    "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "precision": "fp32",
              "checkpoint_every": 2, "log_every": 1, "seed": 0},
}


def _tiny_text_to_image(autoencoder: Path) -> dict:
    return {
        "task": "text_to_image",
        "autoencoder": str(autoencoder),
        "data": {"target": "ldm.data.shapes.ShapesDataset", "params": {"length": 32, "size": 16, "seed": 1}},
        "latent_cache": 32,
        "vocabulary_items": 32,
        "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "max_position_embeddings": 77},
        "unet": {"channels": [8, 16], "layers_per_level": 1, "attention_levels": [False, True], "heads": [1, 2],
                 "transformer_depth": [1, 1], "norm_groups": 4},
        "diffusion": {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2",
                      "caption_dropout": 0.2},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "precision": "fp32",
                  "ema_decay": 0.9, "checkpoint_every": 3, "log_every": 1, "seed": 0},
    }


def _write(config: dict, folder: Path, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{file.parent.name}/{key}": value for file in sorted(folder.rglob("*.safetensors"))
            for key, value in load_file(file).items()}


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("autoencoder")
    return train(_write({**TINY_AUTOENCODER, "output": str(folder / "run")}, folder))


# ------------------------------------------------------------------------------------------------ vocabulary

def test_compact_vocabulary_tokenizes_training_texts_like_full_clip():
    dataset = ShapesDataset(length=200, seed=3)
    texts = [text for index in range(200) for text in dataset[index]["captions"]]
    compact, full = compact_clip_tokenizer(texts), clip_tokenizer()
    assert len(compact) < 1000
    for text in texts[::7] + ["赤い丸", "a red circle to the left of a blue square"]:
        assert compact.tokenize(text) == full.tokenize(text)
    # unseen words still tokenize, into byte-level pieces the compact vocabulary holds
    ids = compact("an unseen zebra", add_special_tokens=True)["input_ids"]
    assert max(ids) == compact.eos_token_id == len(compact) - 1 and ids[0] == compact.bos_token_id


def test_whole_characters_make_each_japanese_character_one_token(tmp_path):
    from transformers import CLIPTokenizer

    texts = ["青い四角の左に赤い丸", "黄色い三角が二つ", "a red circle to the left of a blue square"]
    compact, full = compact_clip_tokenizer(texts, whole_characters=True), clip_tokenizer()
    assert len(full.tokenize(texts[0])) == 21  # CLIP's BPE: UTF-8 byte pieces, 丸 alone is two
    assert compact.tokenize(texts[0]) == list(texts[0])
    assert compact.tokenize(texts[2]) == full.tokenize(texts[2])  # ASCII as before
    compact.save_pretrained(tmp_path)
    ids = compact(texts)["input_ids"]
    assert CLIPTokenizer.from_pretrained(tmp_path)(texts)["input_ids"] == ids  # as diffusers loads it
    assert load_tokenizer(tmp_path)(texts)["input_ids"] == ids


def test_a_new_vocabulary_keeps_the_outputs_of_shared_tokens():
    from transformers import CLIPTextConfig, CLIPTextModel

    old_tokenizer = compact_clip_tokenizer(["a red circle on a black background"])
    new_tokenizer = compact_clip_tokenizer(["make the red circle blue", "a red circle on a black background"])
    assert old_tokenizer.get_vocab() != new_tokenizer.get_vocab()
    torch.manual_seed(0)
    old = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=len(old_tokenizer),
                                       bos_token_id=old_tokenizer.bos_token_id,
                                       eos_token_id=old_tokenizer.eos_token_id,
                                       pad_token_id=old_tokenizer.pad_token_id)).eval()
    new = transfer_vocabulary(old, old_tokenizer, new_tokenizer).eval()
    text = ["a red circle on a black background"]
    with torch.no_grad():
        before = CLIPTextEncoder(old, old_tokenizer).encode(text).tokens
        after = CLIPTextEncoder(new, new_tokenizer).encode(text).tokens
    torch.testing.assert_close(after, before)


def test_widened_unet_ignores_the_new_channels_until_trained():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(8, 16), layers_per_level=1, attention_levels=(False, True), heads=(1, 2),
                           transformer_depth=(1, 1), context_dim=8, norm_groups=4)).eval()
    wide = widen_input(unet, 8).eval()
    x, condition, context = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat([x, condition], 1), t, context), unet(x, t, context))
    assert wide.config.in_channels == 8


# -------------------------------------------------------------------------------------------------- objectives

class _Oracle(torch.nn.Module):
    """Knows the clean latents, so it can return the exact target the objective asks for."""

    def __init__(self, clean: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.clean, self.alphas_cumprod, self.prediction_type = clean, alphas_cumprod, prediction_type

    def forward(self, noisy, timesteps, context):
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        noise = (noisy - signal * self.clean) / sigma  # x_t = signal * x0 + sigma * eps, solved for eps
        return {"epsilon": noise, "v_prediction": (signal * noisy - self.clean) / sigma,
                "sample": self.clean}[self.prediction_type]


class _Text(torch.nn.Module):
    def forward(self, ids):
        return type("Output", (), {"last_hidden_state": torch.zeros(ids.shape[0], ids.shape[1], 4)})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_is_zero_for_the_exact_target(prediction_type):
    schedule = NoiseSchedule.from_config("squaredcos_cap_v2")
    clean = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    objective = TextToImageObjective(_Oracle(clean, schedule.alphas_cumprod, prediction_type), _Text(), schedule,
                                     prediction_type)
    loss, _ = objective(clean, torch.zeros(6, 5, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8
    wrong = TextToImageObjective(_Oracle(clean + 0.1, schedule.alphas_cumprod, prediction_type), _Text(), schedule,
                                 prediction_type)
    assert wrong(clean, torch.zeros(6, 5, dtype=torch.long), generator=torch.Generator().manual_seed(1))[0].item() > 1e-4


def test_changed_region_weights_the_cells_an_edit_changes():
    source = torch.zeros(1, 4, 2, 2)
    target = source.clone()
    target[0, :, 0, 0] = 1.0           # mean |difference| 1: changed
    target[0, :2, 1, 1] = 0.6          # mean 0.3: below the threshold
    weights = ChangedRegion(weight=3.0, threshold=0.5)(source, target)
    assert weights.tolist() == [[[[4.0, 1.0], [1.0, 1.0]]]]
    assert ChangedRegion(weight=-0.5)(source, target).tolist() == [[[[0.5, 1.0], [1.0, 1.0]]]]
    with pytest.raises(ValueError, match="changed_region"):
        ChangedRegion(weight=-1.0)


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_loss_weights_give_the_weighted_mean_squared_error(weight):
    """An x0 oracle off by 0.1 in the left half of every image: the loss is the closed-form weighted mean."""
    schedule = NoiseSchedule.from_config("squaredcos_cap_v2")
    clean = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    off = torch.zeros_like(clean)
    off[..., :4] = 0.1
    objective = TextToImageObjective(_Oracle(clean + off, schedule.alphas_cumprod, "sample"), _Text(), schedule,
                                     "sample")
    weights = torch.ones(3, 1, 8, 8)
    weights[..., :4] += weight
    loss, _ = objective(clean, torch.zeros(3, 5, dtype=torch.long), loss_weights=weights,
                        generator=torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(0.01 * (1 + weight) / (2 + weight), rel=1e-5)


def test_token_labels_cover_the_tokens_after_the_relation_through_eos():
    from transformers import CLIPTextConfig, CLIPTextModel

    texts = ["a red circle to the left of a blue square", "青い四角の左に赤い丸", "two red circles", ""]
    tokenizer = compact_clip_tokenizer(texts, whole_characters=True)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(tokenizer)))
    encoder = CLIPTextEncoder(model, tokenizer)
    tokens = encoder.tokenize(texts)
    labels = token_labels(encoder, texts, tokens, RelationTokenLabels())
    ids, _ = encoder.frame(tokens)
    labelled = [tokenizer.convert_ids_to_tokens(ids[row][labels[row] >= 0].tolist()) for row in range(len(texts))]
    assert labelled == [["a</w>", "blue</w>", "square</w>", "<|endoftext|>"], ["赤", "い", "丸", "<|endoftext|>"], [], []]
    assert set(labels[0][labels[0] >= 0].tolist()) == {RELATIONS.index("right of")}  # the square lies right
    assert set(labels[1][labels[1] >= 0].tolist()) == {RELATIONS.index("left of")}   # the circle lies left


def test_token_classifier_loss_is_weighted_cross_entropy_over_labelled_tokens():
    torch.manual_seed(0)
    classifier = TokenClassifier(hidden_size=6, classes=4, weight=0.25)
    states = torch.randn(2, 5, 6)
    labels = torch.tensor([[-100, -100, 1, 1, 1], [-100, 3, -100, -100, -100]])
    loss, metrics = classifier(states, labels)
    expected = torch.nn.functional.cross_entropy(classifier.head(torch.stack([states[0, 2], states[0, 3], states[0, 4],
                                                                              states[1, 1]])), torch.tensor([1, 1, 1, 3]))
    torch.testing.assert_close(loss, 0.25 * expected)
    assert metrics["token_loss"] == pytest.approx(expected.item())
    nothing, metrics = classifier(states, torch.full((2, 5), -100))
    assert nothing.item() == 0 and metrics == {}  # a batch without relation captions adds nothing (not NaN)


# ------------------------------------------------------------------------------------------------ the loop

def test_autoencoder_training_lowers_the_loss(tmp_path):
    config = {**TINY_AUTOENCODER, "output": str(tmp_path / "run"),
              "train": {**TINY_AUTOENCODER["train"], "steps": 80, "lr": 3e-3, "checkpoint_every": 80, "log_every": 20}}
    train(_write(config, tmp_path))
    losses = [yaml.safe_load(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]


def test_cosine_schedule_warms_up_then_falls_to_min_lr_at_the_last_step(tmp_path):
    config = {**TINY_AUTOENCODER, "output": str(tmp_path / "run"),
              "train": {**TINY_AUTOENCODER["train"], "steps": 6, "lr": 1e-3, "warmup_steps": 2,
                        "lr_schedule": "cosine", "min_lr": 1e-4, "checkpoint_every": 6, "log_every": 1}}
    train(_write(config, tmp_path))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # warm-up 1/2, 2/2; then min + (lr - min)(1 + cos(pi k/3))/2 for k = 0..3
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3, 7.75e-4, 3.25e-4, 1e-4])


@pytest.mark.parametrize("override, problem", [({"lr_schedule": "linear"}, "lr_schedule"),
                                               ({"min_lr": 2e-3}, "min_lr")])
def test_bad_lr_schedule_is_refused_by_name(override, problem):
    with pytest.raises(ValueError, match=problem):
        TrainSettings(lr=1e-3, **override).check()


def test_resumed_run_continues_exactly(tmp_path, trained_autoencoder):
    straight = _write({**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "straight")},
                      tmp_path, "straight.yaml")
    train(straight, ["train.steps=4", "train.checkpoint_every=4"])
    interrupted = _write({**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "resumed")},
                         tmp_path, "resumed.yaml")
    train(interrupted, ["train.steps=2", "train.checkpoint_every=2"])  # stops at step 2 as if killed after it
    train(interrupted, ["train.steps=4", "train.checkpoint_every=2"])
    first, second = _weights(tmp_path / "straight" / "model"), _weights(tmp_path / "resumed" / "model")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


def test_evaluation_tracks_the_run_without_changing_it(tmp_path, trained_autoencoder):
    """`evaluation:` scores every eval_every-th export into log.jsonl; the scores are ShapeEval's own, and the
    weights are those of the same run without evaluation."""
    base = _tiny_text_to_image(trained_autoencoder)
    base["train"] = {**base["train"], "steps": 4, "checkpoint_every": 1, "eval_every": 2}
    probe = {"limit": 1, "images_per_prompt": 1, "steps": 2, "guidance": 3.0}
    tracked = train(_write({**base, "output": str(tmp_path / "tracked"),
                            "evaluation": {"target": "ldm.evaluation.ShapeEvalProbe", "params": probe}},
                           tmp_path, "tracked.yaml"))
    plain = train(_write({**base, "output": str(tmp_path / "plain"), "train": {**base["train"], "eval_every": None}},
                         tmp_path, "plain.yaml"))
    records = [json.loads(line) for line in (tmp_path / "tracked" / "log.jsonl").read_text().splitlines()]
    evaluations = [record for record in records if "eval" in record]
    assert [record["step"] for record in evaluations] == [2, 4]
    report = evaluate_model(str(tracked), steps=2, guidance=3.0, images_per_prompt=1, limit=1, progress=False)
    assert evaluations[-1]["eval"] == {"overall": report.overall(),
                                       **{category: report.accuracy(category) for category in CATEGORIES},
                                       "overall/seen": report.overall(split="seen"),
                                       "overall/held_out": report.overall(split="held_out"),
                                       "overall/en": report.overall(language="en"),
                                       "overall/ja": report.overall(language="ja")}
    first, second = _weights(tracked), _weights(plain)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("eval_every, evaluation, message", [
    (3, True, "multiple of train.checkpoint_every"),
    (2, False, "no `evaluation:` section"),
])
def test_evaluation_settings_are_checked(tmp_path, trained_autoencoder, eval_every, evaluation, message):
    config = _tiny_text_to_image(trained_autoencoder)
    config["train"] = {**config["train"], "checkpoint_every": 2, "eval_every": eval_every}
    if evaluation:
        config["evaluation"] = {"target": "ldm.evaluation.ShapeEvalProbe"}
    with pytest.raises(ValueError, match=message):
        train(_write({**config, "output": str(tmp_path / "run")}, tmp_path))


def test_exported_model_matches_diffusers(tmp_path, trained_autoencoder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm import LatentDiffusionPipeline

    model = train(_write({**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "run")}, tmp_path))
    ours = LatentDiffusionPipeline.from_pretrained(model)
    theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    ours.progress_bar = False
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 16, "width": 16, "output_type": "np"}
    expected = theirs("赤い丸", latents=latents, **kwargs).images
    actual = ours("赤い丸", latents=latents, **kwargs).images
    np.testing.assert_allclose(actual, expected, atol=2e-3)
    # DDIM by name, as diffusers builds it from the folder's config: x0 unclamped, as latents need
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    assert theirs.scheduler.config.clip_sample is False
    expected = theirs("赤い丸", latents=latents, **kwargs).images
    np.testing.assert_allclose(ours("赤い丸", latents=latents, sampler="DDIM", **kwargs).images, expected, atol=2e-3)
    # the latent scaling was measured from the data: unit variance in the UNet's space
    cached = torch.load(tmp_path / "run" / "latents.pt", weights_only=True)
    assert ours.vae.config.scaling_factor == pytest.approx(1 / cached["latents"].float().std().item(), rel=1e-3)


def test_token_labels_train_a_classifier_the_export_leaves_out(tmp_path, trained_autoencoder):
    """With `token_labels:` the log shows the classifier learning; the exported model is the plain pipeline."""
    config = {**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "run"),
              "data": {"target": "ldm.data.shapes.ShapesDataset",
                       "params": {"length": 32, "size": 16, "seed": 1, "scene_kinds": {"pair": 1}}},
              "token_labels": {"target": "ldm.data.shapes.RelationTokenLabels", "weight": 1.0}}
    config["diffusion"] = {**config["diffusion"], "caption_dropout": 0.0}
    config["train"] = {**config["train"], "steps": 100, "checkpoint_every": 100, "lr": 3e-3, "batch_size": 8}
    model = train(_write(config, tmp_path))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    token_losses = [record["token_loss"] for record in records if "token_loss" in record]
    assert len(token_losses) == 100 and np.mean(token_losses[-20:]) < 0.75 * np.mean(token_losses[:20])
    assert not any("token_classifier" in key or "head" in key for key in _weights(model))
    assert load_components(str(model)).unet is not None


def test_training_continues_from_an_exported_model(tmp_path, trained_autoencoder):
    """A new machine has the shipped weights but not checkpoint.pt: `init` starts from them (fresh optimiser)."""
    first = train(_write({**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "first")},
                         tmp_path, "first.yaml"))
    config = {**_tiny_text_to_image(first), "output": str(tmp_path / "second"), "init": str(first)}
    config["train"] = {**config["train"], "steps": 1, "lr": 1e-12, "ema_decay": None}
    second = train(_write(config, tmp_path, "second.yaml"))
    before, after = _weights(first), _weights(second)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0, msg=key)  # lr ~0: weights unchanged


def test_a_continued_model_can_change_its_vocabulary(tmp_path, trained_autoencoder):
    """`whole_characters` on a model trained without it: Japanese characters get rows of their own, and what the
    text encoder says of English captions (tokens both vocabularies share) stays as it was."""
    first = train(_write({**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "first")},
                         tmp_path, "first.yaml"))
    config = {**_tiny_text_to_image(first), "output": str(tmp_path / "second"), "init": str(first),
              "whole_characters": True}
    config["train"] = {**config["train"], "steps": 1, "lr": 1e-12, "ema_decay": None}
    second = train(_write(config, tmp_path, "second.yaml"))
    old, new = (load_components(str(model)).text_encoder for model in (first, second))
    assert new.tokenizer.tokenize("赤い丸") == ["赤", "い", "丸"] != old.tokenizer.tokenize("赤い丸")
    english = ["a red circle to the left of a blue square", "two green triangles on a gray background"]
    with torch.no_grad():
        torch.testing.assert_close(new.encode(english).tokens, old.encode(english).tokens, atol=1e-5, rtol=0)


def test_two_processes_equal_one_process_with_accumulation(tmp_path, trained_autoencoder):
    base = _tiny_text_to_image(trained_autoencoder)
    base["train"] = {**base["train"], "steps": 2, "checkpoint_every": 2}
    single = _write({**base, "output": str(tmp_path / "single"),
                     "train": {**base["train"], "grad_accumulation": 2}}, tmp_path, "single.yaml")
    double = _write({**base, "output": str(tmp_path / "ddp")}, tmp_path, "ddp.yaml")
    # Both runs in child processes with one thread each: matmul results depend on the thread count in the last bits.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    commands = ([sys.executable, "-m", "ldm", "train", str(single)],
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "--master-port", str(_free_port()), "-m", "ldm", "train", str(double)])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    first, second = _weights(tmp_path / "single" / "model"), _weights(tmp_path / "ddp" / "model")
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5, msg=key)


def test_edit_stage_starts_from_a_text_to_image_model_and_exports_an_instruct_pix2pix_folder(
        tmp_path, trained_autoencoder):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    base = train(_write({**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "t2i")}, tmp_path))
    config = {"task": "instruct_edit", "init": str(base), "output": str(tmp_path / "edit"), "latent_cache": 16,
              "data": {"target": "ldm.data.edits.EditDataset", "params": {"length": 16, "size": 16, "seed": 2}},
              "diffusion": {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"},
              "train": {"steps": 1, "batch_size": 4, "lr": 1e-12, "warmup_steps": 1, "precision": "fp32",
                        "checkpoint_every": 1, "log_every": 1, "seed": 0}}
    probe = {"per_kind": 1, "steps": 2}
    model = train(_write({**config, "evaluation": {"target": "ldm.edit_evaluation.EditEvalProbe", "params": probe}},
                         tmp_path, "edit.yaml"))
    (logged,) = [json.loads(line)["eval"] for line in (tmp_path / "edit" / "log.jsonl").read_text().splitlines()
                 if "eval" in line]
    report = evaluate_edit_model(str(model), steps=2, per_kind=1, progress=False)
    assert logged == {"success": report.overall("success"), "preservation": report.overall("preservation"),
                      **{f"success/{kind}": report.rate("success", kind) for kind in EDIT_CATEGORIES},
                      **{f"{metric}/{language}": report.overall(metric, language)
                         for metric in ("success", "preservation") for language in ("en", "ja")}}
    index = yaml.safe_load((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    theirs = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, safety_checker=None)
    assert theirs.unet.config.in_channels == 8
    # lr ~0: the text-to-image weights came through, the new input channels are still zero
    before, after = _weights(base), _weights(model)
    added = after["unet/conv_in.weight"][:, 4:]
    torch.testing.assert_close(added, torch.zeros_like(added), atol=1e-9, rtol=0)
    torch.testing.assert_close(after["unet/conv_in.weight"][:, :4], before["unet/conv_in.weight"], atol=1e-6, rtol=0)
    for key in before:
        if key.startswith("unet/") and key != "unet/conv_in.weight":
            torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0, msg=key)
    cached = torch.load(tmp_path / "edit" / "latents.pt", weights_only=True)
    assert cached["source"].shape == cached["target"].shape == (16, 4, 8, 8)
    assert len(cached["instructions"]) == 16 and all(cached["instructions"])
    # an edit model continues as one (8 input channels, its own weights)
    # (with the instruction contrast: a batch of all 16 edits holds moves and placed additions)
    contrast = {"target": "ldm.data.edits.OppositeDirection", "weight": 1.0, "margin": 0.5, "min_timestep": 500}
    # (and the changed-region weights, which only reweight the loss)
    again = train(_write({**config, "init": str(model), "output": str(tmp_path / "again"), "caption_contrast": contrast,
                          "changed_region": {"weight": 3.0, "threshold": 0.5},
                          "train": {**config["train"], "batch_size": 16}}, tmp_path, "again.yaml"))
    continued = _weights(again)
    for key, value in _weights(model).items():
        torch.testing.assert_close(continued[key], value, atol=1e-6, rtol=0, msg=key)
    (record,) = [json.loads(line) for line in (tmp_path / "again" / "log.jsonl").read_text().splitlines()]
    assert 0 < record["contrast_loss"] <= 0.5 - record["contrast_gap"] + 1e-6


# ------------------------------------------------------------------------------------------------ bad configs

def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="task"):
        load_config(_write({**TINY_AUTOENCODER, "task": "painting"}, tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stepz'\]"):
        dataclass_from(TrainSettings, {"stepz": 3}, "train")
    with pytest.raises(ValueError, match="targets must be ldm names"):
        instantiate({"target": "os.system", "params": {"command": "true"}}, "data")
    with pytest.raises(ValueError, match="precision"):
        TrainSettings(precision="fp8").check()



class _CaptionText(torch.nn.Module):
    """Token states that are the token ids, so a stub UNet can tell captions apart."""

    def forward(self, ids):
        return type("Output", (), {"last_hidden_state": ids.float().unsqueeze(-1).expand(-1, -1, 4)})


class _OffByCaption(torch.nn.Module):
    """The exact v-prediction target for the latent `clean` (every row the same) plus `offsets[first token]`, so
    each caption has a known error; it records the timesteps and the image-condition channels of every call."""

    def __init__(self, clean: torch.Tensor, alphas_cumprod: torch.Tensor, offsets: dict[int, float]):
        super().__init__()
        self.clean, self.alphas_cumprod, self.offsets = clean, alphas_cumprod, offsets
        self.calls, self.conditions = [], []

    def forward(self, noisy, timesteps, context):
        self.calls.append(timesteps)
        noisy, condition = noisy.split([self.clean.shape[1], noisy.shape[1] - self.clean.shape[1]], dim=1)
        self.conditions.append(condition)
        offset = torch.tensor([self.offsets[int(token)] for token in context[:, 0, 0]]).view(-1, 1, 1, 1)
        return _Oracle(self.clean + offset, self.alphas_cumprod, "v_prediction")(noisy, timesteps, context)


@pytest.mark.parametrize("wrong_offset, margin", [(0.3, 0.05), (0.1 * math.exp(0.01), 0.05)])
def test_caption_contrast_is_a_hinge_on_the_log_ratio_of_the_wrong_and_right_errors(wrong_offset, margin):
    """With v-prediction, latents off by d give the error d^2 / sigma^2 at every timestep, so the log ratio of the
    wrong caption's error over the right one's is 2 ln(d_wrong / d_right) whatever timesteps are drawn."""
    schedule = NoiseSchedule.from_config("squaredcos_cap_v2")
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = _OffByCaption(clean, schedule.alphas_cumprod, {1: 0.0, 2: 0.1, 3: wrong_offset})
    contrast = CaptionContrast(weight=0.5, margin=margin, min_timestep=900)
    objective = TextToImageObjective(unet, _CaptionText(), schedule, "v_prediction", caption_contrast=contrast)
    ids = torch.tensor([[1], [2], [1], [2]])  # rows 1 and 3: a right caption whose error is that of 0.1 ...
    contradicted = torch.tensor([1, 3]), torch.tensor([[3], [3]])  # ... and a wrong one, that of wrong_offset
    loss, metrics = objective(clean.repeat(4, 1, 1, 1), ids, contradicted=contradicted,
                              generator=torch.Generator().manual_seed(1))
    gap = 2 * math.log(wrong_offset / 0.1)
    assert [len(t) for t in unet.calls] == [4, 4] and bool((unet.calls[1] >= 900).all())
    assert metrics["contrast_gap"] == pytest.approx(gap, rel=1e-3)
    assert metrics["contrast_loss"] == pytest.approx(max(0.0, margin - gap), abs=1e-5)
    assert loss.item() == pytest.approx(metrics["diffusion_loss"] + 0.5 * metrics["contrast_loss"], rel=1e-5)



def test_an_edit_models_contrast_denoises_beside_each_contradicted_rows_own_source():
    """Both instructions of a contradicted row see that row's source latents; the hinge is the same as without."""
    schedule = NoiseSchedule.from_config("squaredcos_cap_v2")
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = _OffByCaption(clean, schedule.alphas_cumprod, {1: 0.0, 2: 0.1, 3: 0.3})
    objective = TextToImageObjective(unet, _CaptionText(), schedule, "v_prediction",
                                     caption_contrast=CaptionContrast(weight=1.0, margin=0.05, min_timestep=500))
    sources = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    contradicted = torch.tensor([1, 3]), torch.tensor([[3], [3]])
    _, metrics = objective(clean.repeat(4, 1, 1, 1), torch.tensor([[1], [2], [1], [2]]), image_condition=sources,
                           contradicted=contradicted, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unet.conditions[0], sources)
    assert torch.equal(unet.conditions[1], sources[[1, 3]].repeat(2, 1, 1, 1))
    assert metrics["contrast_gap"] == pytest.approx(2 * math.log(3), rel=1e-3)


class _CaptionOffsets(torch.nn.Module):
    """A UNet that predicts a learnable constant per caption (its first token): prediction = offsets[token]."""

    def __init__(self, offsets: list[float]):
        super().__init__()
        self.offsets = torch.nn.Parameter(torch.tensor(offsets))

    def forward(self, noisy, timesteps, context):
        return self.offsets[context[:, 0, 0].long()].view(-1, 1, 1, 1).expand(-1, 4, *noisy.shape[2:])


def test_caption_consistency_pulls_a_caption_towards_its_reference_and_leaves_the_reference_alone():
    """Predictions o_s (the caption) and o_r (its reference): the term is w (o_s - o_r)^2, its gradient reaches o_s
    only (2 w (o_s - o_r) per referenced row, averaged), and rows without a reference add nothing."""
    unet = _CaptionOffsets([0.0, 0.5, 0.2, 0.0])
    objective = TextToImageObjective(unet, _CaptionText(), NoiseSchedule.from_config("squaredcos_cap_v2"), "sample",
                                     caption_consistency=CaptionConsistency(weight=2.0))
    latents = torch.zeros(3, 4, 2, 2)
    referenced = torch.tensor([0, 2]), torch.tensor([[2], [2]])  # rows 0 and 2 (caption 1) refer to caption 2
    loss, metrics = objective(latents, torch.tensor([[1], [3], [1]]), referenced=referenced,
                              generator=torch.Generator().manual_seed(0))
    assert metrics["consistency_loss"] == pytest.approx((0.5 - 0.2) ** 2)
    diffusion = ((0.5 ** 2) * 2 + 0.0) / 3  # "sample" predicts the clean latents (0): rows of caption 1 miss by 0.5
    assert metrics["diffusion_loss"] == pytest.approx(diffusion)
    loss.backward()
    consistency_grad = 2.0 * 2 * (0.5 - 0.2)
    diffusion_grad = 2 * 0.5 * 2 / 3  # d/d o_1 of the mean over 3 rows, two of them caption 1
    assert unet.offsets.grad.tolist() == pytest.approx([0.0, diffusion_grad + consistency_grad, 0.0, 0.0])


def test_english_translation_pairs_each_japanese_caption_with_the_english_one_that_says_the_same():
    translate = EnglishTranslation()
    for index in range(40):
        scene_captions = ShapesDataset(length=40, size=16, seed=3)[index]["captions"]
        english = [text for text in scene_captions if text.isascii()]
        japanese = [text for text in scene_captions if not text.isascii()]
        assert [translate(text, scene_captions) for text in japanese] == english
        assert translate(english[0], scene_captions) is None
    scene_captions = ["a red circle", "a red circle on a white background", "赤い丸"]
    assert translate("赤い丸", scene_captions) is None  # the languages' phrasings do not pair up


def test_contradicting_captions_pair_each_relation_caption_with_its_opposite():
    from transformers import CLIPTextConfig, CLIPTextModel

    texts = ["a red circle to the left of a blue square", "", "a red circle and a blue square", "青い四角の上に赤い丸"]
    tokenizer = compact_clip_tokenizer(texts + ["a red circle to the right of a blue square", "青い四角の下に赤い丸"],
                                       whole_characters=True)
    encoder = CLIPTextEncoder(CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, vocab_size=len(tokenizer))),
                              tokenizer)
    rows, ids = contradicting_captions(encoder, texts, OppositeRelation(), "cpu")
    assert rows.tolist() == [0, 3]
    expected, _ = encoder.frame(encoder.tokenize(["a red circle to the right of a blue square", "青い四角の下に赤い丸"]))
    assert torch.equal(ids, expected)
    assert contradicting_captions(encoder, texts[1:3], OppositeRelation(), "cpu") is None


def test_caption_consistency_runs_from_the_config(tmp_path, trained_autoencoder):
    config = {**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "run"),
              "caption_consistency": {"target": "ldm.data.shapes.EnglishTranslation", "weight": 0.5}}
    config["diffusion"] = {**config["diffusion"], "caption_dropout": 0.0}
    train(_write(config, tmp_path))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    consistent = [record for record in records if "consistency_loss" in record]  # steps with a Japanese caption
    assert consistent and all(record["consistency_loss"] >= 0 for record in consistent)
    config["caption_consistency"]["weight"] = 0
    with pytest.raises(ValueError, match=r"caption_consistency weight=0 must be > 0"):
        train(_write({**config, "output": str(tmp_path / "bad")}, tmp_path, "bad.yaml"))
    edit = {**config, "task": "instruct_edit", "init": str(tmp_path / "run" / "model"), "output": str(tmp_path / "e")}
    with pytest.raises(ValueError, match="caption_consistency applies to task text_to_image only"):
        train(_write(edit, tmp_path, "edit.yaml"))


def test_caption_contrast_runs_from_the_config(tmp_path, trained_autoencoder):
    """`caption_contrast:` logs the loss and the mean log error ratio; a bad setting is named before training."""
    config = {**_tiny_text_to_image(trained_autoencoder), "output": str(tmp_path / "run"),
              "data": {"target": "ldm.data.shapes.ShapesDataset",
                       "params": {"length": 32, "size": 16, "seed": 1, "scene_kinds": {"pair": 1}}},
              "caption_contrast": {"target": "ldm.data.shapes.OppositeRelation", "weight": 1.0, "margin": 0.5}}
    config["diffusion"] = {**config["diffusion"], "caption_dropout": 0.0}
    train(_write(config, tmp_path))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    contrasts = [record for record in records if "contrast_gap" in record]
    assert len(contrasts) == 3 and all(0 < record["contrast_loss"] <= 0.5 - record["contrast_gap"] + 1e-6
                                       for record in contrasts)
    config["caption_contrast"]["min_timestep"] = 1000
    with pytest.raises(ValueError, match=r"min_timestep=1000 must lie in \[0, 1000\)"):
        train(_write({**config, "output": str(tmp_path / "bad")}, tmp_path, "bad.yaml"))
    config["caption_contrast"]["colour"] = 1
    with pytest.raises(ValueError, match=r"caption_contrast: unknown field\(s\) \['colour'\]"):
        train(_write({**config, "output": str(tmp_path / "bad")}, tmp_path, "bad.yaml"))
