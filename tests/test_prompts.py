"""A1111 prompt syntax (closed-form weights) and chunked, weighted encoding against the plain encoder."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models.text_encoders import CLIPTextEncoder, clip_tokenizer
from ldm.prompts import BREAK, apply_weights, chunk_prompt, encode_prompt, parse_prompt_attention


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 ** 2)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("[[cat]]", [("cat", 1 / 1.1 ** 2)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("( cat : 0.5 )", [(" cat ", 0.5)]),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("((a) b:2)", [("a", 2.2), (" b", 2.0)]),
    (r"\(cat\) \[dog\]", [("(cat) [dog]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),        # unclosed: weighs to the end
    ("a [cat", [("a ", 1.0), ("cat", 1 / 1.1)]),
    ("a ) b ]", [("a ) b ]", 1.0)]),                 # unmatched closers are text
    ("time: 5", [("time: 5", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_rules(prompt, expected):
    parsed = parse_prompt_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_break_splits_segments():
    assert parse_prompt_attention("a cat BREAK (a dog)") == [("a cat", 1.0), (BREAK, -1.0), ("a dog", 1.1)]
    assert parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]


def test_bad_explicit_weight_is_rejected():
    with pytest.raises(ValueError, match="not a number"):
        parse_prompt_attention("(cat:1.2.3)")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=49408, max_position_embeddings=77, projection_dim=16)
    return CLIPTextEncoder(CLIPTextModel(config).eval(), clip_tokenizer())


def test_plain_prompt_equals_encoder_encode(encoder):
    prompts = ["a photo of a cat", "an astronaut riding a horse, 4k"]
    with torch.no_grad():
        ours, plain = encode_prompt(encoder, prompts), encoder.encode(prompts)
    assert torch.equal(ours.tokens, plain.tokens)
    assert torch.equal(ours.pooled, plain.pooled)


def test_long_prompt_gets_three_chunks_and_batch_pads_with_empty_prompt(encoder):
    long_prompt = " ".join(["cat"] * 200)  # "cat" is one token
    with torch.no_grad():
        encoding = encode_prompt(encoder, [long_prompt, ""])
        empty = encoder.encode([""]).tokens
        second = encoder.encode([" ".join(["cat"] * 75)]).tokens
    assert encoding.tokens.shape == (2, 3 * 77, 32)
    torch.testing.assert_close(encoding.tokens[0:1, 77:154], second, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoding.tokens[1:2, 77:154], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoding.tokens[1:2, 154:], empty, rtol=0, atol=1e-6)


def test_chunks_break_after_last_comma_and_at_break(encoder):
    words = ["cat"] * 70 + [","] + ["dog"] * 10  # comma at index 70: chunk 1 ends with it, the dogs move on
    chunks = chunk_prompt(encoder, " ".join(words))
    assert [len(c.ids) for c in chunks] == [71, 10]
    far_comma = " ".join(["cat"] * 5 + [","] + ["dog"] * 80)  # tail after the comma > 20: hard cut at 75
    assert [len(c.ids) for c in chunk_prompt(encoder, far_comma)] == [75, 11]
    assert [len(c.ids) for c in chunk_prompt(encoder, "a cat BREAK a dog")] == [2, 2]


def test_weights_scale_tokens_and_keep_the_mean(encoder):
    with torch.no_grad():
        weighted = encode_prompt(encoder, ["a (cat:1.5) [dog]"]).tokens
        plain = encoder.encode(["a cat dog"]).tokens
    weights = torch.ones(1, 77)
    weights[0, 2], weights[0, 3] = 1.5, 1 / 1.1  # BOS at 0, "a" at 1
    expected = plain * weights[..., None]
    expected = expected * plain.mean() / expected.mean()
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighted.mean(), plain.mean())


def test_apply_weights_is_per_prompt():
    tokens = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[5.0, 5.0], [5.0, 5.0]]])
    weights = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    # prompt 0: weighted sum 8+4=12 -> scaled to the original sum 8; prompt 1 untouched.
    expected = torch.tensor([[[2.0, 6.0], [2.0, 2.0]], [[5.0, 5.0], [5.0, 5.0]]]) * torch.tensor([8 / 12, 1.0])[:, None, None]
    torch.testing.assert_close(apply_weights(tokens, weights), expected)


def test_single_string_is_rejected(encoder):
    with pytest.raises(ValueError, match="wrap"):
        encode_prompt(encoder, "a cat")
