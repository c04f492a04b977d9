"""Vision towers: pooling, the HF CLIP tower's feature selection, freeze, tower dtype, gradient
checkpointing, and the dtype combinations DeepSpeed accepts.

Module-level imports stay light: the DeepSpeed test spawns a worker that imports this module.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

import pytest
import torch
from torch import nn

VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
CNN = dict(name="resnet10t")
CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                   image_size=32, patch_size=8)
TOWERS: dict[str, dict[str, Any]] = {"timm": VIT, "hf_clip": dict(kind="hf_clip", config=CLIP_CONFIG)}
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _pixels(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def _tower(base: dict[str, Any], **options: Any) -> nn.Module:
    from vlforge.models.towers.build import build_vision_tower

    torch.manual_seed(0)  # same trunk weights for every tower built from `base`
    return build_vision_tower({**base, **options})


class _WithHead(nn.Module):
    """A tower and an fp32 head: the part of a model that trains while the tower may not."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.width, 3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled, tokens = self.tower(pixels)
        return self.head(pooled + tokens.mean(dim=1)).pow(2).mean()


# --- pooling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["default", "cls", "mean", "attention"])
def test_timm_pool_shapes(pool):
    pooled, tokens = _tower(VIT, pool=pool)(_pixels())
    assert pooled.shape == (2, 64) and tokens.shape == (2, 1 + 16, 64)
    assert pooled.dtype == tokens.dtype == torch.float32


def test_timm_pool_values():
    px = _pixels()
    towers = {pool: _tower(VIT, pool=pool).eval() for pool in ("default", "cls", "mean")}
    reference = towers["default"].backbone
    with torch.no_grad():
        features = reference.forward_features(towers["default"].normalize(px))
        out = {pool: tower(px) for pool, tower in towers.items()}
    for pooled, tokens in out.values():
        torch.testing.assert_close(tokens, features)  # same trunk weights, same tokens
    # default is timm's head pooling, unchanged (the CLS token on a ViT).
    torch.testing.assert_close(out["default"][0], reference.forward_head(features, pre_logits=True))
    torch.testing.assert_close(out["cls"][0], features[:, 0])
    torch.testing.assert_close(out["mean"][0], features[:, 1:].mean(dim=1))
    assert not torch.allclose(out["mean"][0], features.mean(dim=1), atol=1e-4)  # the CLS token is left out


def test_timm_mean_pool_leaves_out_register_tokens():
    tower = _tower(VIT, pool="mean", reg_tokens=2).eval()
    assert tower.num_prefix_tokens == 3
    with torch.no_grad():
        pooled, tokens = tower(_pixels())
    assert tokens.shape == (2, 3 + 16, 64)
    torch.testing.assert_close(pooled, tokens[:, 3:].mean(dim=1))


def test_cnn_mean_pool_is_over_all_positions_and_cls_is_refused():
    tower = _tower(CNN, pool="mean").eval()
    with torch.no_grad():
        pooled, tokens = tower(_pixels(size=64))
    assert tokens.shape == (2, 4, tower.width)  # a 2x2 map at stride 32
    torch.testing.assert_close(pooled, tokens.mean(dim=1))
    with pytest.raises(ValueError, match="class token"):
        _tower(CNN, pool="cls")
    with pytest.raises(ValueError, match="pool"):
        _tower(VIT, pool="max")


def test_cnn_token_norm_normalises_tokens_and_leaves_the_pooled_feature():
    torch.manual_seed(0)
    plain = _tower(CNN).eval()
    normed = _tower(CNN, token_norm=True).eval()
    normed.load_state_dict(plain.state_dict(), strict=False)  # same trunk; the norm starts as identity affine
    with torch.no_grad():
        pooled, tokens = normed(_pixels(size=64))
        plain_pooled, plain_tokens = plain(_pixels(size=64))
    torch.testing.assert_close(pooled, plain_pooled)
    torch.testing.assert_close(tokens, torch.nn.functional.layer_norm(plain_tokens, (plain.width,)))
    assert tokens.mean(dim=-1).abs().max() < 1e-4


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_attention_pool_trains(kind):
    tower = _tower(TOWERS[kind], pool="attention").train()
    pooled, tokens = tower(_pixels())
    assert pooled.shape == (2, tower.width)
    (pooled - 1.0).pow(2).mean().backward()
    for name, param in tower.attention_pool.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # ... and through the tokens into the trunk, down to its patch embedding.
    first = tower.trunk.patch_embed.proj if kind == "timm" else tower.trunk.embeddings.patch_embedding
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


# --- HF CLIP tower ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_towers():
    """One tower per (feature_layer, feature_select), all with the same weights."""
    return {(layer, select): _tower(TOWERS["hf_clip"], feature_layer=layer, feature_select=select).eval()
            for layer in (-2, -1, 0, 1) for select in ("patch", "cls_patch")}


@pytest.mark.parametrize("layer", [-2, -1, 0, 1])
@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_clip_feature_selection_matches_hidden_states(clip_towers, layer, select):
    tower = clip_towers[(layer, select)]
    px = _pixels()
    normalised = (px.float() / 255.0 - CLIP_MEAN) / CLIP_STD
    with torch.no_grad():
        pooled, tokens = tower(px)
        torch.testing.assert_close(tower.normalize(px), normalised)
        reference = tower.model(pixel_values=normalised, output_hidden_states=True)
    hidden = reference.hidden_states[layer]
    torch.testing.assert_close(tokens, hidden[:, 1:] if select == "patch" else hidden)
    assert tokens.shape == (2, 16 if select == "patch" else 17, 32)
    torch.testing.assert_close(pooled, reference.pooler_output)  # CLIP's post-layernormed CLS
    assert tower.width == 32


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_clip_pool_reads_the_selected_layer(pool):
    tower = _tower(TOWERS["hf_clip"], pool=pool).eval()
    px = _pixels()
    with torch.no_grad():
        pooled, _ = tower(px)
        hidden = tower.model(pixel_values=tower.normalize(px), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(pooled, hidden[:, 0] if pool == "cls" else hidden[:, 1:].mean(dim=1))


def test_clip_tower_from_pretrained_directory(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    saved = CLIPVisionModel(CLIPVisionConfig(**CLIP_CONFIG)).eval()
    saved.save_pretrained(tmp_path)
    tower = _tower(dict(kind="hf_clip"), pretrained=str(tmp_path), feature_layer=-1).eval()
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(tower.model.state_dict()[name], value, msg=name)
    with torch.no_grad():
        _, tokens = tower(_pixels())
        expected = saved(pixel_values=tower.normalize(_pixels())).last_hidden_state[:, 1:]
    torch.testing.assert_close(tokens, expected)
    low = _tower(dict(kind="hf_clip"), pretrained=str(tmp_path), dtype="bf16", freeze=True)
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}


def test_clip_tower_rejects_bad_options():
    with pytest.raises(ValueError, match="exactly one"):
        _tower(dict(kind="hf_clip"))
    with pytest.raises(ValueError, match="feature_select"):
        _tower(TOWERS["hf_clip"], feature_select="cls")
    with pytest.raises(ValueError, match="feature_layer"):
        _tower(TOWERS["hf_clip"], feature_layer=5)


def test_build_vision_tower_kinds():
    from vlforge.core.errors import ConfigError
    from vlforge.models.towers.hf_clip import HFCLIPVisionTower
    from vlforge.models.towers.timm_tower import TimmVisionTower

    assert isinstance(_tower(VIT), TimmVisionTower) and isinstance(_tower(VIT, kind="timm"), TimmVisionTower)
    assert isinstance(_tower(TOWERS["hf_clip"]), HFCLIPVisionTower)
    with pytest.raises(ConfigError, match="model.vision.kind"):
        _tower(VIT, kind="open_clip")
    with pytest.raises(ConfigError, match="model.vision.dtype"):
        _tower(VIT, dtype="float8")


def test_check_tower_precision():
    from vlforge.core.errors import ConfigError
    from vlforge.models.towers.base import check_tower_precision

    check_tower_precision({"dtype": "bf16"}, "fp32")
    check_tower_precision({}, "bf16")
    with pytest.raises(ConfigError, match="model.vision.dtype=bf16 needs trainer.precision=fp32"):
        check_tower_precision({"dtype": "bf16"}, "bf16")


# --- freeze, dtype, gradient checkpointing ----------------------------------------------------------

DROPOUT = {"timm": dict(proj_drop_rate=0.5, attn_drop_rate=0.5),
           "hf_clip": dict(config={**CLIP_CONFIG, "attention_dropout": 0.5})}


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_freeze(kind):
    tower = _tower({**TOWERS[kind], **DROPOUT[kind]}, freeze=True, pool="attention")
    model = _WithHead(tower).train()
    assert not tower.trunk.training and tower.attention_pool.training  # frozen trunk stays in eval
    assert not any(p.requires_grad for p in tower.trunk.parameters())
    before = {name: p.detach().clone() for name, p in tower.trunk.named_parameters()}
    px = _pixels()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = model(px)
    first.backward()
    assert all(p.grad is None for p in tower.trunk.parameters())
    assert model.head.weight.grad is not None and tower.attention_pool.query.grad is not None
    optimizer.step()
    for name, p in tower.trunk.named_parameters():
        assert torch.equal(p, before[name]), name
    # Dropout is off in the trunk: the same pixels give the same tokens in train mode.
    with torch.no_grad():
        torch.testing.assert_close(tower(px)[1], tower(px)[1])
    model.eval().train()
    assert not tower.trunk.training


def test_freeze_keeps_batchnorm_statistics():
    tower = _tower(CNN, freeze=True)
    model = _WithHead(tower).train()
    stats = {name: b.clone() for name, b in tower.trunk.named_buffers() if "running" in name}
    model(_pixels(size=64)).backward()
    for name, b in tower.trunk.named_buffers():
        if name in stats:
            assert torch.equal(b, stats[name]), name


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_bf16_tower_with_fp32_head(kind, freeze):
    tower = _tower(TOWERS[kind], dtype="bf16", freeze=freeze)
    model = _WithHead(tower).train()
    assert {p.dtype for p in tower.trunk.parameters()} == {torch.bfloat16}
    assert model.head.weight.dtype == torch.float32
    pooled, tokens = tower(_pixels())
    assert pooled.dtype == tokens.dtype == torch.float32
    loss = model(_pixels())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.head.weight.grad.dtype == torch.float32 and model.head.weight.grad.abs().sum() > 0
    grads = [p.grad for p in tower.trunk.parameters()]
    if freeze:
        assert all(g is None for g in grads)
    else:
        reached = [g for g in grads if g is not None]
        assert reached and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in reached)
        assert sum(g.float().abs().sum() for g in reached) > 0


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_gradient_checkpointing_same_gradients(kind):
    grads, calls = {}, {}
    for checkpointing in (False, True):
        tower = _tower(TOWERS[kind], grad_checkpointing=checkpointing)
        model = _WithHead(tower).train()
        torch.manual_seed(0)
        model.head.reset_parameters()
        # A module inside the first block (transformers checkpoints the layer's forward, not its hooks),
        # counted on entry: the recompute stops once it has what backward needs, before the MLP returns.
        mlp = tower.trunk.blocks[0].mlp if kind == "timm" else tower.trunk.encoder.layers[0].mlp
        count = []
        mlp.register_forward_pre_hook(lambda *_: count.append(1))
        model(_pixels()).backward()
        grads[checkpointing] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        calls[checkpointing] = len(count)
    assert calls == {False: 1, True: 2}  # checkpointing reruns the block in backward
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 4
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# --- DeepSpeed (one process, gloo, CPU) -------------------------------------------------------------

# name: (ZeRO stage, engine bf16, tower options, expected: "trains" or the start of an error message)
DEEPSPEED_CASES: dict[str, tuple[int, bool, dict[str, Any], str]] = {
    "zero2_frozen_bf16": (2, False, {**VIT, "dtype": "bf16", "freeze": True}, "trains"),
    "zero2_trainable_bf16": (2, False, {**VIT, "dtype": "bf16"}, "model.vision.dtype=bf16 but the tower's"),
    "zero3_frozen_bf16": (3, False, {**VIT, "dtype": "bf16", "freeze": True}, "trains"),
    "zero3_frozen_bf16_clip": (3, False, {**TOWERS["hf_clip"], "dtype": "bf16", "freeze": True}, "trains"),
    "zero3_trainable_bf16": (3, False, {**VIT, "dtype": "bf16"}, "model.vision.dtype=bf16 with a trainable"),
    # No tower dtype, bf16 engine: DeepSpeed casts parameters but not the PixelNormalize buffers.
    "zero0_bf16_engine": (0, True, dict(VIT), "trains"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_case(stage: int, bf16: bool, vision: dict[str, Any]) -> dict[str, Any]:
    import contextlib

    import deepspeed

    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    with deepspeed.zero.Init(config_dict_or_path=config) if stage == 3 else contextlib.nullcontext():
        model = _WithHead(_tower(vision))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def snapshot() -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {name: p.detach().clone() for name, p in model.named_parameters()}

    before = snapshot()
    loss = engine(_pixels())
    engine.backward(loss)
    engine.step()
    after = snapshot()
    pooled, _ = engine.module.tower(_pixels())
    return {
        "changed": sorted({name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}),
        "trunk_dtypes": sorted({str(p.dtype) for p in model.tower.trunk.parameters()}),
        "output_dtype": str(pooled.dtype),
        "head_dtype": str(model.head.weight.dtype),
    }


def _deepspeed_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed("gloo")
    results = {}
    for name, (stage, bf16, vision, _) in DEEPSPEED_CASES.items():
        try:
            results[name] = _deepspeed_case(stage, bf16, vision)
        except ValueError as error:  # ConfigError
            results[name] = {"error": str(error)}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


def test_deepspeed_tower_dtypes(tmp_path):
    """fp32 engine: a frozen bf16 tower trains the fp32 head under ZeRO-2 and ZeRO-3 (tower untouched,
    outputs fp32); a trainable bf16 tower is refused with an error naming model.vision.dtype (ZeRO-2
    would silently promote it to fp32, ZeRO-3's optimizer would fail on mixed dtypes)."""
    import torch.multiprocessing as mp

    mp.spawn(_deepspeed_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    results = json.loads((tmp_path / "results.json").read_text())
    for name, (_, bf16, vision, expected) in DEEPSPEED_CASES.items():
        result = results[name]
        if expected != "trains":
            assert result.get("error", "").startswith(expected), (name, result)
            continue
        assert "error" not in result, (name, result)
        low = "torch.bfloat16"
        assert result["trunk_dtypes"] == [low if vision.get("dtype") == "bf16" or bf16 else "torch.float32"], name
        assert result["output_dtype"] == result["head_dtype"] == (low if bf16 else "torch.float32"), (name, result)
        assert result["changed"] == (["head"] if vision.get("freeze") else ["head", "tower"]), (name, result)
