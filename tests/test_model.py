"""The VDSR network: size, parameter count, receptive field, residual."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_vdsr.core.model import FLOPS_PER_PIXEL, VDSR, receptive_field

torch.set_num_threads(1)


def test_default_parameter_count_matches_paper():
    net = VDSR()
    assert net.num_weights() == 664_704
    assert net.num_biases() == 1_217
    assert sum(p.numel() for p in net.parameters()) == 664_704 + 1_217
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert FLOPS_PER_PIXEL == pytest.approx(1.329e6, rel=1e-3)
    assert net.flops_per_pixel() == pytest.approx(FLOPS_PER_PIXEL)


@pytest.mark.parametrize("shape", [(1, 1, 41, 41), (2, 1, 17, 30), (1, 1, 5, 3)])
def test_output_size_equals_input_size(shape):
    net = VDSR(depth=4, width=8)
    with torch.inference_mode():
        out = net(torch.rand(shape))
    assert out.shape == shape


def test_default_net_output_size():
    net = VDSR()
    with torch.inference_mode():
        out = net(torch.rand(1, 1, 23, 19))
    assert out.shape == (1, 1, 23, 19)


def test_receptive_field_radius_is_depth():
    depth = 5
    net = VDSR(depth=depth, width=4)
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.5)
            torch.nn.init.normal_(m.bias, 0.1, 0.05)
    x = torch.rand(1, 1, 31, 31)
    y = x.clone()
    y[0, 0, 15, 15] += 1.0
    with torch.inference_mode():
        d = (net(y) - net(x)).abs()[0, 0] - (y - x).abs()[0, 0]
    changed = np.argwhere(d.numpy() > 0)
    assert changed.size > 0
    radius = np.abs(changed - 15).max()
    assert radius <= depth
    assert receptive_field(depth) == 2 * depth + 1


def test_residual_output_is_input_plus_body():
    net = VDSR(depth=3, width=4)
    x = torch.rand(1, 1, 12, 12)
    with torch.inference_mode():
        assert torch.allclose(net(x), x + net.body(x))
        torch.nn.init.zeros_(net.body[-1].weight)
        torch.nn.init.zeros_(net.body[-1].bias)
        assert torch.equal(net(x), x)


def test_register_model_never_moves_a_name_to_another_file(tmp_path, monkeypatch) -> None:
    from napari_vdsr.core import weights

    monkeypatch.setattr(weights, "_user_models", {})
    paths = []
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
        paths.append(weights.save_model(VDSR(depth=3, width=4), tmp_path / folder / "cells.safetensors",
                                        {"tasks": ["sr"], "scales": [2.0]}))
    assert weights.register_model(paths[0], name="cells") == "cells"
    assert weights.register_model(paths[0], name="cells") == "cells"  # the same file again: the same name
    assert weights.register_model(paths[1], name="cells") == "cells-2"
    assert weights.register_model(paths[2], name="cells") == "cells-3"
    assert weights.resolve_model_path("cells").resolve() == paths[0].resolve()
    assert weights.resolve_model_path("cells-2").resolve() == paths[1].resolve()
    bundled = weights.default_model_name("sr")
    name = weights.register_model(paths[1], name=bundled)
    assert name != bundled and weights.resolve_model_path(bundled).parent.name == "weights"


def test_card_of_an_interrupted_export_comes_from_the_weights(tmp_path) -> None:
    import json

    from napari_vdsr.core import weights

    p = weights.save_model(VDSR(depth=3, width=4), tmp_path / "m.safetensors",
                           {"tasks": ["sr"], "training": {"steps": 200}, "metrics": {"validation": {"psnr": 30.0}}})
    side = p.with_suffix(".json")
    card = json.loads(side.read_text())
    card["metrics"]["benchmarks"] = {"Set5": 1.0}  # numbers added to the sidecar later are read
    side.write_text(json.dumps(card))
    assert weights.read_card(p)["metrics"]["benchmarks"] == {"Set5": 1.0}
    card["training"]["steps"] = 100  # the sidecar of an earlier export: the weights' own card wins
    side.write_text(json.dumps(card))
    assert weights.read_card(p)["training"]["steps"] == 200


def test_a_dotted_model_name_is_kept_and_found_again(tmp_path) -> None:
    from napari_vdsr.core import weights

    a = weights.save_model(VDSR(depth=3, width=4), tmp_path / "sr-x1.5", {"tasks": ["sr"], "name": "a"})
    b = weights.save_model(VDSR(depth=3, width=4), tmp_path / "sr-x1.25", {"tasks": ["sr"], "name": "b"})
    assert (a.name, b.name) == ("sr-x1.5.safetensors", "sr-x1.25.safetensors")  # neither overwrites the other
    assert a.with_suffix(".json").is_file() and b.with_suffix(".json").is_file()
    net, card = weights.load_model(tmp_path / "sr-x1.5", device="cpu")
    assert card["name"] == "a" and isinstance(net, VDSR)
    assert weights.save_model(VDSR(depth=3, width=4), tmp_path / "c.json", {"tasks": ["sr"]}).name == "c.safetensors"
