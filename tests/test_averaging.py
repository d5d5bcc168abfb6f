"""Weight averaging (`ldm average`): every tensor is the weighted mean computed directly from the sources, the
first model's configs are kept, and models of different architectures are refused with one clear line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_random_components
from ldm.averaging import average_models, mean_state_dict, normalized_weights
from ldm.cli import main
from ldm.loading import load_components, save_diffusers_folder

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _states(components) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {key: tensor.clone() for key, tensor in network.state_dict().items()}
            for name, network in components.networks.items()}


def test_mean_state_dict_is_the_weighted_sum_in_the_first_dtype():
    generator = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=generator).half(), "ids": torch.arange(5)}
    b = {"w": torch.randn(3, 4, generator=generator), "ids": torch.arange(5)}
    mean = mean_state_dict([a, b], [0.25, 0.75])
    assert mean["w"].dtype == torch.float16
    torch.testing.assert_close(mean["w"], (0.25 * a["w"].float() + 0.75 * b["w"]).half(), rtol=0, atol=0)
    assert torch.equal(mean["ids"], torch.arange(5))


@pytest.mark.parametrize("other, problem", [
    ({"w": torch.zeros(2, 2), "ids": torch.arange(5)}, "shape"),
    ({"v": torch.zeros(3, 4), "ids": torch.arange(5)}, "other tensors"),
    ({"w": torch.zeros(3, 4), "ids": torch.arange(1, 6)}, "integer tensor ids differs"),
])
def test_mean_state_dict_refuses_different_layouts(other, problem):
    with pytest.raises(ValueError, match=problem):
        mean_state_dict([{"w": torch.zeros(3, 4), "ids": torch.arange(5)}, other], [0.5, 0.5])


def test_weights_default_to_equal_and_are_scaled_to_sum_to_one():
    assert normalized_weights(4, None) == [0.25] * 4
    assert normalized_weights(2, [1, 3]) == [0.25, 0.75]
    for count, weights, problem in [(1, None, "at least two"), (2, [1.0], "one weight per model"),
                                    (2, [1.0, 0.0], "positive"), (2, [1.0, float("nan")], "positive")]:
        with pytest.raises(ValueError, match=problem):
            normalized_weights(count, weights)


def test_average_models_averages_every_network_and_keeps_the_first_configs():
    first, second, third = (tiny_random_components(seed) for seed in (0, 1, 2))
    second.vae.config = dataclasses.replace(second.vae.config, scaling_factor=0.5)  # a re-measured statistic
    sources = [_states(model) for model in (first, second, third)]
    averaged = average_models([first, second, third], [2, 1, 1])
    assert averaged.vae.config.scaling_factor == first.vae.config.scaling_factor
    result = _states(averaged)
    assert sorted(result) == ["text_encoder", "unet", "vae"]
    for name in result:
        for key, tensor in result[name].items():
            expected = 0.5 * sources[0][name][key] + 0.25 * sources[1][name][key] + 0.25 * sources[2][name][key]
            torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=1e-6, atol=1e-7)
    differing = sum(not torch.equal(result["unet"][key], sources[0]["unet"][key]) for key in result["unet"])
    assert differing > len(result["unet"]) // 2


def test_average_models_refuses_other_architectures():
    with pytest.raises(ValueError, match=r"model 2's unet differs .*channels"):
        average_models([tiny_random_components(0), tiny_random_components(1, unet_channels=(32, 32))])


def test_command_writes_the_average_and_refuses_a_mismatch_in_one_line(tmp_path, capsys):
    folders = []
    for seed, channels in [(0, (32, 64)), (1, (32, 64)), (2, (32, 32))]:
        folders.append(tmp_path / f"model{seed}")
        save_diffusers_folder(tiny_random_components(seed, unet_channels=channels), folders[-1])
    output = tmp_path / "average"
    assert main(["average", str(folders[0]), str(folders[1]), "--weights", "1", "3", "--output", str(output),
                 "--dtype", "float16"]) == 0
    assert capsys.readouterr().out.strip() == str(output.resolve())
    a, b = (load_components(folder).unet.state_dict() for folder in folders[:2])
    written = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {torch.float16}
    for key, tensor in load_components(output).unet.state_dict().items():
        torch.testing.assert_close(tensor, (0.25 * a[key] + 0.75 * b[key]).half().float(), rtol=0, atol=0)

    refused = tmp_path / "refused"
    assert main(["average", str(folders[0]), str(folders[2]), "--output", str(refused)]) == 2
    error = capsys.readouterr().err
    assert "unet differs" in error and len(error.strip().splitlines()) == 1
    assert not refused.exists()
