"""Options of timm towers that only a convolutional trunk uses: token positions and NHWC memory order."""
from __future__ import annotations

import pytest
import torch


def test_token_position_tells_places_apart() -> None:
    # A CNN map's tokens get a fixed 2-D code: equal images give tokens that differ by place.
    from vlforge.models.towers.timm_tower import TimmVisionTower, sincos_position_code

    tower = TimmVisionTower("resnet10t", token_norm=True, token_position=True)
    plain = TimmVisionTower("resnet10t", token_norm=True)
    plain.load_state_dict(tower.state_dict())
    pixels = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    with torch.no_grad():
        _, coded = tower.eval()(pixels)
        _, bare = plain.eval()(pixels)
    code = coded - bare
    assert code.shape == (1, 4, 512)  # 64 px / stride 32: a 2x2 map
    assert not torch.allclose(code[0, 0], code[0, 1]) and not torch.allclose(code[0, 0], code[0, 2])
    torch.testing.assert_close(code[0], sincos_position_code(2, 2, 512))
    with pytest.raises(ValueError, match="token_position"):
        TimmVisionTower("vit_tiny_patch16_224", img_size=32, token_position=True)


def test_channels_last_tower_computes_the_same_in_nhwc() -> None:
    # The recipes' CNN towers run NHWC for speed: same outputs and gradients, and the convolutions do
    # get NHWC inputs (an input left NCHW would silently lose the speed).
    from vlforge.models.towers.timm_tower import TimmVisionTower

    torch.manual_seed(0)
    nchw = TimmVisionTower("resnet10t").train()
    nhwc = TimmVisionTower("resnet10t", channels_last=True).train()
    nhwc.load_state_dict(nchw.state_dict())
    layouts: list[bool] = []
    for module in nhwc.backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(
                lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    outputs = [tower(pixels) for tower in (nchw, nhwc)]
    assert layouts and all(layouts), layouts
    for (pooled, tokens), tower in zip(outputs, (nchw, nhwc)):
        (pooled.square().sum() + tokens.mean()).backward()
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-5)
    grads = dict(nchw.named_parameters())
    for name, param in nhwc.named_parameters():
        # Summation order differs between the layouts: compare against each gradient's own scale.
        scale = grads[name].grad.abs().max().item()
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=0, atol=1e-4 * scale, msg=name)
