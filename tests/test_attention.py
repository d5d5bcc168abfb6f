import importlib.util

import pytest
import torch

from ldm.models.attention import Attention, attention, set_attention_backend
from ldm.models.unet import UNet, UNetConfig

TINY = UNetConfig(channels=(16, 32), attention_levels=(True, True), heads=(2, 4), transformer_depth=(1, 1),
                  context_dim=8, norm_groups=8)


def qkv(seed=0, shape=(2, 3, 10, 8)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(3)]


def test_math_backend_closed_form():
    # One query and two keys with scores 0 and log(3)*sqrt(d): softmax weights 1/4, 3/4.
    d = 4
    q = torch.tensor([[[[1.0, 0, 0, 0]]]])
    k = torch.tensor([[[[0.0, 0, 0, 0], [torch.log(torch.tensor(3.0)) * d**0.5, 0, 0, 0]]]])
    v = torch.tensor([[[[4.0, 0, 0, 0], [8.0, 0, 0, 0]]]])
    out = attention(q, k, v, backend="math")
    assert out[0, 0, 0, 0].item() == pytest.approx(0.25 * 4 + 0.75 * 8)


@pytest.mark.parametrize("slice_size", [None, 1, 3, 64])
def test_backends_and_slicing_agree(slice_size):
    q, k, v = qkv()
    reference = attention(q, k, v, backend="math")
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(attention(q, k, v, backend, slice_size), reference, atol=1e-6, rtol=0)


def test_upcast_keeps_half_precision_output_close():
    q, k, v = qkv()
    reference = attention(q, k, v, backend="math")
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="math", upcast=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=0)


def test_one_switch_sets_every_layer_and_keeps_results():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8)
    with torch.no_grad():
        reference = unet(x, 10, context)
        set_attention_backend(unet, "math", slice_size=7)
        layers = [m for m in unet.modules() if isinstance(m, Attention)]
        assert layers and all(m.backend == "math" and m.slice_size == 7 for m in layers)
        torch.testing.assert_close(unet(x, 10, context), reference, atol=1e-5, rtol=0)


def test_bad_backend_names_the_choices():
    with pytest.raises(ValueError, match="sdpa"):
        set_attention_backend(UNet(TINY), "flash")
    with pytest.raises(ValueError, match="slice_size"):
        set_attention_backend(UNet(TINY), "sdpa", slice_size=0)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers installed")
def test_xformers_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers"):
        set_attention_backend(UNet(TINY), "xformers")
