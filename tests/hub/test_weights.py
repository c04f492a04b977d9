"""Weights from elsewhere: reading checkpoints of every kind, and starting a model from them
(`trainer.init_from`), plainly and under ZeRO-3 partitioning."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.e2e.conftest import free_port
from vlforge.core.errors import CheckpointError
from vlforge.core.state_dict import read_weights
from vlforge.hub.weights import init_weights
from vlforge.models.blip.pretrain import BlipPretrain
from vlforge.models.blip.vqa import BlipVQA
from vlforge.models.towers.timm_tower import TimmVisionTower

TEXT = dict(vocab_size=50, width=32, layers=2, heads=4, intermediate=64, max_len=16)
VISION = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)


def _pretrained(tmp_path: Path) -> tuple[BlipPretrain, Path]:
    torch.manual_seed(0)
    model = BlipPretrain(VISION, TEXT, embed_dim=16, bos_token_id=1, eos_token_id=2)
    path = tmp_path / "pretrain.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)  # LAVIS's layout: weights under "model"
    return model, path


def test_read_weights_of_every_kind(tmp_path: Path) -> None:
    model, pth = _pretrained(tmp_path)
    state = model.state_dict()
    assert read_weights(pth).keys() == state.keys()
    save_file({k: v.clone().contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")  # no shared storage
    assert torch.equal(read_weights(tmp_path / "w.safetensors")["vision_proj.weight"], state["vision_proj.weight"])
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    assert read_weights(tmp_path / "hf").keys() == state.keys()
    with pytest.raises(CheckpointError, match="no weights at"):
        read_weights(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_weights(tmp_path / "list.pt")


def test_a_finetune_starts_from_pretrained_weights(tmp_path: Path) -> None:
    pretrained, pth = _pretrained(tmp_path)
    torch.manual_seed(1)
    vqa = BlipVQA(VISION, TEXT, bos_token_id=1, eos_token_id=2)
    loaded, report = init_weights(vqa, str(pth))
    for name, value in vqa.state_dict().items():
        assert torch.equal(value, pretrained.state_dict()[name]), name
    assert loaded == len(vqa.state_dict())
    assert "vision_proj.weight" in report.unexpected and "itm_head.weight" in report.unexpected  # pretraining heads
    bigger = BlipVQA(VISION, {**TEXT, "layers": 3}, bos_token_id=1, eos_token_id=2)
    with pytest.raises(CheckpointError, match=r"missing \['text_encoder.layers.2"):
        init_weights(bigger, str(pth))
    with pytest.raises(CheckpointError, match="cannot import 'vlforge.models.blip.convert:nothing'"):
        init_weights(vqa, str(pth), "vlforge.models.blip.convert:nothing")


def test_a_partial_start_keeps_the_weights_the_checkpoint_lacks_or_shapes_differently(tmp_path: Path) -> None:
    pretrained, pth = _pretrained(tmp_path)
    torch.manual_seed(1)
    bigger = BlipVQA(VISION, {**TEXT, "layers": 3, "intermediate": 80}, bos_token_id=1, eos_token_id=2)
    fresh = {k: v.clone() for k, v in bigger.state_dict().items()}
    loaded, report = init_weights(bigger, str(pth), partial=True)
    assert report.missing and all(k.startswith(("text_encoder.layers.2.", "text_decoder.layers.2.")) for k in report.missing)
    assert report.mismatched and all(".intermediate." in k or ".output." in k for k in report.mismatched)
    for name, value in bigger.state_dict().items():
        if name in report.missing or name in report.mismatched:
            assert torch.equal(value, fresh[name]), name  # kept its initialisation
        else:
            assert torch.equal(value, pretrained.state_dict()[name]), name
    assert loaded == len(bigger.state_dict()) - len(report.missing) - len(report.mismatched)
    with pytest.raises(CheckpointError, match="no weight that fits"):
        torch.save({"other.weight": torch.zeros(2)}, tmp_path / "unrelated.pt")
        init_weights(bigger, str(tmp_path / "unrelated.pt"), partial=True)


def test_albef_starts_both_towers_from_a_dual_encoder(tmp_path: Path) -> None:
    # albef_retrieval_demo: the CLIP demo's tower into ALBEF's model and momentum copies, text fresh.
    from vlforge.models.albef.model import ALBEF
    from vlforge.models.clip.model import CLIP

    vision = dict(name="resnet10t")
    clip = CLIP(vision, dict(vocab_size=50, width=32, layers=2, heads=4, max_len=16), embed_dim=16)
    clip.vision.backbone.conv1[1].running_mean.uniform_()  # a buffer too: BatchNorm statistics
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    albef = ALBEF(vision, dict(TEXT, layers=3), embed_dim=16, fusion_layer=1, queue_size=8)
    text_before = albef.model.text.word_embeddings.weight.clone()
    _, report = init_weights(albef, str(tmp_path / "clip.pt"), "vlforge.models.albef.convert:albef_towers_from_dual_encoder",
                             partial=True)
    for name, value in clip.vision.state_dict().items():
        assert torch.equal(albef.model.vision.state_dict()[name], value), name
        assert torch.equal(albef.momentum_model.vision.state_dict()[name], value), name
    assert torch.equal(albef.model.text.word_embeddings.weight, text_before)
    assert not report.mismatched and all(".vision." not in k for k in report.missing)
    with pytest.raises(KeyError, match="no 'vision.' weights"):
        torch.save({"text.weight": torch.zeros(2)}, tmp_path / "text_only.pt")
        init_weights(albef, str(tmp_path / "text_only.pt"), "vlforge.models.albef.convert:albef_towers_from_dual_encoder",
                     partial=True)


def test_vit_position_embeddings_follow_the_image_size(tmp_path: Path) -> None:
    _, pth = _pretrained(tmp_path)  # 32 px images: a 4x4 grid + class token
    bigger = BlipVQA({**VISION, "img_size": 48}, TEXT, bos_token_id=1, eos_token_id=2)  # 6x6 + class token
    init_weights(bigger, str(pth))
    pos = bigger.vision.backbone.pos_embed
    assert pos.shape == (1, 37, 32)
    source = torch.load(pth)["model"]["vision.backbone.pos_embed"]
    assert torch.equal(pos[:, :1], source[:, :1])  # the class token's embedding is kept as it is
    # The grid is resampled as BLIP's own code does it (LAVIS's interpolate_pos_embed, transformers'
    # interpolate_pos_encoding: bicubic without antialiasing), here transformers' run for real.
    from transformers.models.blip.configuration_blip import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionEmbeddings

    embeddings = BlipVisionEmbeddings(BlipVisionConfig(hidden_size=32, image_size=32, patch_size=8))
    embeddings.position_embedding = torch.nn.Parameter(source.clone())
    expected = embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), 48, 48)
    torch.testing.assert_close(pos.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


def _zero3_worker(rank: int, port: int, pth: str, out: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import deepspeed

    deepspeed.init_distributed("gloo")
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = BlipVQA(VISION, TEXT, bos_token_id=1, eos_token_id=2)
    init_weights(model, pth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, out)
    # A pretrained timm tower built under zero.Init keeps the weights timm loads after building it.
    with deepspeed.zero.Init(config_dict_or_path=config):
        tower = TimmVisionTower(**VISION, pretrained=str(Path(out).parent / "timm.pth"))
    engine, *_ = deepspeed.initialize(model=tower, optimizer=torch.optim.AdamW(tower.parameters(), lr=0.0), config=config)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        torch.save({k: v.clone() for k, v in engine.module.backbone.state_dict().items()}, Path(out).parent / "tower.pt")


def test_init_and_pretrained_towers_under_zero3_partitions(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    pretrained, pth = _pretrained(tmp_path)
    out = tmp_path / "zero3.pt"
    timm_weights = {k: v.clone() for k, v in pretrained.vision.backbone.state_dict().items()}
    torch.save(timm_weights, tmp_path / "timm.pth")
    mp.spawn(_zero3_worker, args=(free_port(), str(pth), str(out)), nprocs=1, join=True)
    loaded = torch.load(out)
    for name, value in loaded.items():
        assert torch.equal(value, pretrained.state_dict()[name]), name
    for name, value in torch.load(tmp_path / "tower.pt").items():
        assert torch.equal(value, timm_weights[name]), name
