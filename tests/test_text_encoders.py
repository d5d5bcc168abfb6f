"""Text encoders against their references: diffusers' encode_prompt, open_clip's own forward, transformers' T5."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from open_clip.tokenizer import SimpleTokenizer
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config

from ldm.errors import CheckpointError
from ldm.models.text_encoders import (
    CLIPTextEncoder,
    OpenCLIPTextConfig,
    OpenCLIPTextEncoder,
    T5TextEncoder,
    clip_tokenizer,
    load_tokenizer,
    open_clip_tokenizer,
)

ATOL = 1e-5
LONG_PROMPT = ", ".join(f"detail number {i}" for i in range(40))  # ~120 tokens: truncated at 77
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "(masterpiece:1.2), [best quality], {cat}; 3.14 -- #tag @me!!! 'quoted' don't",
    "富士山の上を飛ぶ猫、水彩画",
    "",
    LONG_PROMPT,
]


def tiny_clip_config(**overrides) -> CLIPTextConfig:
    fields = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def sd1_tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return CLIPTextModel(tiny_clip_config()).eval()


@pytest.fixture(scope="module")
def open_clip_encoder():
    torch.manual_seed(0)
    config = OpenCLIPTextConfig(width=32, heads=4, layers=3, projection_dim=16)
    return OpenCLIPTextEncoder.from_config(config, clip_skip=1)


@pytest.fixture(scope="module")
def t5_encoder():
    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5TextEncoder.from_config(config, ByT5Tokenizer(), max_length=24)


def diffusers_encode_prompt(tokenizer, text_encoder, prompts) -> torch.Tensor:
    """The real StableDiffusionPipeline.encode_prompt on a stand-in pipeline holding only what it reads."""
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, unet=None)
    with torch.no_grad():
        embeds, _ = StableDiffusionPipeline.encode_prompt(pipe, prompts, "cpu", 1, False)
    return embeds


def diffusers_clip_skip(tokenizer, model, prompts, clip_skip) -> torch.Tensor:
    """encode_prompt's clip_skip branch by hand (diffusers reaches `text_encoder.text_model`, which transformers 5
    no longer has): hidden_states[-(clip_skip + 1)] through the final layer norm."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return getattr(model, "text_model", model).final_layer_norm(hidden)


# Tokenizers ---------------------------------------------------------------------------------------------------


def test_offline_clip_tokenizer_has_openai_vocabulary(sd1_tokenizer):
    assert len(sd1_tokenizer) == 49408
    assert (sd1_tokenizer.bos_token_id, sd1_tokenizer.eos_token_id, sd1_tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert sd1_tokenizer.convert_ids_to_tokens([0, 255, 256, 511]) == ["!", "Ń", "!</w>", "Ń</w>"]
    # Ids OpenAI CLIP assigns ("a"=320, "photo"=1125, "of"=539, "cat"=2368), as in every SD1 tokenizer.
    assert sd1_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_offline_clip_tokenizer_matches_open_clip(sd1_tokenizer, prompt):
    ours = sd1_tokenizer(prompt, add_special_tokens=False).input_ids
    assert ours == SimpleTokenizer().encode(prompt)


def test_japanese_prompts_tokenize_to_ids(sd1_tokenizer, open_clip_encoder, t5_encoder, clip_model):
    encoders = [CLIPTextEncoder(clip_model, sd1_tokenizer), open_clip_encoder, t5_encoder]
    for encoder in encoders:
        ids = encoder.tokenize(["猫", "東京の夜景、ネオン"])
        assert all(len(row) > 0 for row in ids)
        assert encoder.tokenize(["東京の夜景、ネオン"])[0] == ids[1]


def test_sd2_style_padding_with_exclamation_mark():
    tokenizer = clip_tokenizer(pad_token="!")
    assert tokenizer.pad_token_id == 0
    assert tokenizer("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


def test_load_tokenizer_from_saved_folders(tmp_path, sd1_tokenizer):
    saved_dir, sd1_dir, bare_dir, t5_dir = (tmp_path / name for name in ("saved", "sd1", "bare", "t5"))
    sd2_tokenizer = clip_tokenizer(pad_token="!")
    sd2_tokenizer.save_pretrained(saved_dir)  # transformers 5 layout: tokenizer.json + tokenizer_config.json
    for folder in (sd1_dir, bare_dir):  # diffusers SD1 layout: vocab.json + merges.txt (+ tokenizer_config.json)
        folder.mkdir()
        sd1_tokenizer.backend_tokenizer.model.save(str(folder))
    (sd1_dir / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"}'
    )
    ByT5Tokenizer().save_pretrained(t5_dir)

    loaded = load_tokenizer(saved_dir)
    assert loaded(PROMPTS).input_ids == sd2_tokenizer(PROMPTS).input_ids
    assert (loaded.pad_token_id, loaded.model_max_length) == (0, 77)
    loaded = load_tokenizer(sd1_dir)
    assert loaded(PROMPTS).input_ids == sd1_tokenizer(PROMPTS).input_ids
    assert (loaded.pad_token_id, loaded.model_max_length) == (49407, 77)
    assert load_tokenizer(bare_dir)(PROMPTS).input_ids == sd1_tokenizer(PROMPTS).input_ids
    assert load_tokenizer(t5_dir)("猫").input_ids == ByT5Tokenizer()("猫").input_ids


def test_load_tokenizer_rejects_folders_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_tokenizer(tmp_path / "missing")


# CLIP ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_frame_matches_diffusers_tokenizer_call(clip_model, pad_token):
    tokenizer = clip_tokenizer(pad_token=pad_token)
    encoder = CLIPTextEncoder(clip_model, tokenizer)
    ids, mask = encoder.frame(encoder.tokenize(PROMPTS))
    reference = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, reference.input_ids)
    assert torch.equal(mask, reference.attention_mask)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_encode_matches_diffusers_encode_prompt(clip_model, pad_token):
    tokenizer = clip_tokenizer(pad_token=pad_token)
    with torch.no_grad():
        encoding = CLIPTextEncoder(clip_model, tokenizer).encode(PROMPTS)
        reference = diffusers_encode_prompt(tokenizer, clip_model, PROMPTS)
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = clip_model(ids.input_ids).pooler_output
    assert encoding.tokens.shape == (len(PROMPTS), 77, 32)
    torch.testing.assert_close(encoding.tokens, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(encoding.pooled, pooled, atol=ATOL, rtol=0)
    assert encoding.attention_mask is None


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(clip_model, sd1_tokenizer, clip_skip):
    with torch.no_grad():
        encoding = CLIPTextEncoder(clip_model, sd1_tokenizer, clip_skip=clip_skip).encode(PROMPTS)
        unskipped = CLIPTextEncoder(clip_model, sd1_tokenizer).encode(PROMPTS)
    reference = diffusers_clip_skip(sd1_tokenizer, clip_model, PROMPTS, clip_skip)
    torch.testing.assert_close(encoding.tokens, reference, atol=ATOL, rtol=0)
    assert not torch.allclose(encoding.tokens, unskipped.tokens, atol=1e-3)
    torch.testing.assert_close(encoding.pooled, unskipped.pooled, atol=0, rtol=0)  # pooled is always the last layer


def test_clip_use_attention_mask_from_config(sd1_tokenizer):
    torch.manual_seed(1)
    model = CLIPTextModel(tiny_clip_config(use_attention_mask=True)).eval()
    with torch.no_grad():
        encoding = CLIPTextEncoder(model, sd1_tokenizer).encode(PROMPTS[:2])
        ids = sd1_tokenizer(PROMPTS[:2], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        unmasked = model(ids.input_ids).last_hidden_state
    torch.testing.assert_close(encoding.tokens, diffusers_encode_prompt(sd1_tokenizer, model, PROMPTS[:2]),
                               atol=ATOL, rtol=0)
    assert not torch.allclose(encoding.tokens, unmasked, atol=1e-3)  # the mask changed the padding states
    assert torch.equal(encoding.attention_mask, ids.attention_mask)


def test_encode_ids_without_mask_equals_encode(sd1_tokenizer):
    torch.manual_seed(2)
    encoder = CLIPTextEncoder(CLIPTextModel(tiny_clip_config(use_attention_mask=True)), sd1_tokenizer)
    ids, _ = encoder.frame(encoder.tokenize(PROMPTS))
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_ids(ids).tokens, encoder.encode(PROMPTS).tokens, atol=0, rtol=0)


def test_state_dict_for_model_accepts_transformers4_keys(clip_model, sd1_tokenizer):
    encoder = CLIPTextEncoder.from_config(tiny_clip_config(), sd1_tokenizer)
    # How diffusers folders and CompVis checkpoints (after their prefix) store CLIP: `text_model.` + old buffer.
    saved = {"text_model." + key: tensor for key, tensor in clip_model.state_dict().items()}
    saved["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    encoder.model.load_state_dict(encoder.state_dict_for_model(saved), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode(PROMPTS).tokens, CLIPTextEncoder(clip_model, sd1_tokenizer).encode(PROMPTS).tokens,
            atol=0, rtol=0,
        )


# OpenCLIP -----------------------------------------------------------------------------------------------------


def test_open_clip_model_holds_exactly_the_sd2_keys(open_clip_encoder):
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                "text_projection"}
    expected |= {f"transformer.resblocks.{n}.{name}" for n in range(3) for name in block}
    assert set(open_clip_encoder.model.state_dict()) == expected
    assert open_clip_encoder.model.text_projection.shape == (32, 16)


def test_open_clip_frame_matches_open_clip_tokenizer(open_clip_encoder):
    ids, _ = open_clip_encoder.frame(open_clip_encoder.tokenize(PROMPTS))
    assert torch.equal(ids, open_clip_tokenizer()(PROMPTS))


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_open_clip_encode_matches_open_clip_forward(open_clip_encoder, clip_skip):
    encoder = OpenCLIPTextEncoder(open_clip_encoder.model, clip_skip=clip_skip)
    ids = open_clip_tokenizer()(PROMPTS)
    with torch.no_grad():
        encoding = encoder.encode(PROMPTS)
        # open_clip's own path: every block's output through ln_final, and pooled text features (encode_text).
        reference = encoder.model.forward_intermediates(ids, normalize_intermediates=True, output_fmt="NLC")
    torch.testing.assert_close(encoding.tokens, reference["text_intermediates"][-1 - clip_skip], atol=ATOL, rtol=0)
    torch.testing.assert_close(encoding.pooled, reference["text_features"], atol=ATOL, rtol=0)
    assert encoding.tokens.shape == (len(PROMPTS), 77, 32)
    assert encoding.pooled.shape == (len(PROMPTS), 16)


def test_open_clip_last_layer_equals_module_forward(open_clip_encoder):
    ids = open_clip_tokenizer()(PROMPTS[:2])
    model = open_clip_encoder.model
    with torch.no_grad():
        encoding = OpenCLIPTextEncoder(model, clip_skip=0).encode_ids(ids)
        model.output_tokens = True
        try:
            pooled, tokens = model(ids)
        finally:
            model.output_tokens = False
    torch.testing.assert_close(encoding.tokens, tokens, atol=ATOL, rtol=0)
    torch.testing.assert_close(encoding.pooled, pooled, atol=ATOL, rtol=0)


def test_open_clip_encode_ids_equals_encode(open_clip_encoder):
    ids, mask = open_clip_encoder.frame(open_clip_encoder.tokenize(PROMPTS))
    with torch.no_grad():
        by_ids = open_clip_encoder.encode_ids(ids, mask)
        by_prompts = open_clip_encoder.encode(PROMPTS)
    torch.testing.assert_close(by_ids.tokens, by_prompts.tokens, atol=0, rtol=0)
    torch.testing.assert_close(by_ids.pooled, by_prompts.pooled, atol=0, rtol=0)


# T5 -----------------------------------------------------------------------------------------------------------


def test_t5_encode_matches_transformers(t5_encoder):
    prompts = ["a cat", "東京の夜景", "a" * 40]
    reference_ids = t5_encoder.tokenizer(prompts, padding="max_length", max_length=24, truncation=True,
                                         return_tensors="pt")
    with torch.no_grad():
        encoding = t5_encoder.encode(prompts)
        reference = t5_encoder.model(**reference_ids).last_hidden_state
    assert encoding.tokens.shape == (3, 24, 32) and encoding.pooled is None
    torch.testing.assert_close(encoding.tokens, reference, atol=ATOL, rtol=0)
    assert torch.equal(encoding.attention_mask, reference_ids.attention_mask)


def test_t5_mask_hides_padding(t5_encoder):
    ids, mask = t5_encoder.frame(t5_encoder.tokenize(["a cat"]))
    filler = torch.randint(3, 384, ids.shape, generator=torch.Generator().manual_seed(0))  # no pad/EOS/UNK ids
    garbage = torch.where(mask.bool(), ids, filler)
    real = mask[0].bool()
    with torch.no_grad():
        clean = t5_encoder.encode_ids(ids, mask).tokens
        noisy = t5_encoder.encode_ids(garbage, mask).tokens
        unmasked = t5_encoder.encode_ids(garbage, torch.ones_like(mask)).tokens
        without_mask = t5_encoder.encode_ids(ids).tokens  # derived: through the first EOS
    torch.testing.assert_close(noisy[0, real], clean[0, real], atol=ATOL, rtol=0)
    assert not torch.allclose(unmasked[0, real], clean[0, real], atol=1e-4)
    torch.testing.assert_close(without_mask, clean, atol=0, rtol=0)


def test_t5_state_dict_for_model_fills_the_tied_embedding(t5_encoder):
    saved = t5_encoder.model.state_dict()
    del saved["encoder.embed_tokens.weight"]  # safetensors keeps one of a tied pair
    adapted = t5_encoder.state_dict_for_model(saved)
    assert set(adapted) == set(t5_encoder.model.state_dict())
    assert adapted["encoder.embed_tokens.weight"] is saved["shared.weight"]


# Bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, message",
    [([], "prompts is empty"), ("a cat", "single string"), (["a cat", 3], r"prompts\[1\] is a int"),
     (None, "list of strings")],
)
def test_bad_prompts_raise_value_error(open_clip_encoder, t5_encoder, prompts, message):
    for encoder in (open_clip_encoder, t5_encoder):
        with pytest.raises(ValueError, match=message):
            encoder.encode(prompts)


@pytest.mark.parametrize(
    "ids, message",
    [(torch.zeros(2, 77), "integer"), (torch.tensor([49406, 49407]), "shape"),
     (torch.full((1, 78), 49407), "positions"), (torch.tensor([[49406, 49408, 49407]]), "must lie in"),
     (torch.tensor([[49406, 320, 0]]), "no end token")],
)
def test_bad_ids_raise_value_error(open_clip_encoder, ids, message):
    with pytest.raises(ValueError, match=message):
        open_clip_encoder.encode_ids(ids)


def test_bad_settings_raise_value_error(clip_model, sd1_tokenizer):
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextEncoder(clip_model, sd1_tokenizer, clip_skip=3)
    with pytest.raises(ValueError, match="model_max_length"):
        CLIPTextEncoder(clip_model, clip_tokenizer(max_length=100))
    with pytest.raises(ValueError, match="activation"):
        OpenCLIPTextConfig(activation="relu")
    with pytest.raises(ValueError, match="max_length"):
        T5TextEncoder.from_config(T5Config(vocab_size=384, d_model=32, num_layers=1, num_heads=4), ByT5Tokenizer())
    with pytest.raises(ValueError, match="attention_mask"):
        CLIPTextEncoder(clip_model, sd1_tokenizer).encode_ids(torch.tensor([[49406, 49407]]), torch.ones(1, 3))
