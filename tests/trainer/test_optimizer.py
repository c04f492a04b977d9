"""Recipe -> AdamW groups, the optimizer and the lr schedule; the schedule as the built DeepSpeed engine
applies it (one engine, in a child process)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from tests.gloo import run_on_ranks
from tests.trainer.runs import make_run
from vlforge.core.errors import ConfigError
from vlforge.trainer.engine import (
    FiniteStepAdamW,
    adamw,
    build_engine,
    build_optimizer,
    deepspeed_config,
    lr_lambda,
    param_groups,
)

pytestmark = pytest.mark.usefixtures("cpu_recipe_env")


# --- param_groups -----------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.vision_proj = nn.Linear(4, 3, bias=False)  # shares the 'vision' text prefix, not the module
        self.text = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_param_groups_weight_decay():
    model = Tiny()
    groups = param_groups(model, make_run("optim.weight_decay=0.2", "optim.lr=0.01"))
    assert len(groups) == 2
    by_decay = {g["weight_decay"]: g for g in groups}
    assert set(by_decay) == {0.0, 0.2}
    assert _names(model, by_decay[0.2]) == {"vision.0.weight", "vision_proj.weight", "text.weight"}
    assert _names(model, by_decay[0.0]) == {"vision.0.bias", "vision.1.weight", "vision.1.bias", "text.bias", "scale"}
    for group in groups:
        assert group["lr"] == pytest.approx(0.01) and group["lr_multiplier"] == 1.0
    # Frozen parameters are left out.
    assert sum(len(g["params"]) for g in groups) == 8


def test_param_groups_lr_multipliers():
    model = Tiny()
    run = make_run("optim.lr=0.01", "optim.weight_decay=0.1", "+optim.lr_multipliers.vision=0.1", "+optim.lr_multipliers.scale=2.0")
    groups = param_groups(model, run)
    found = {(g["weight_decay"], g["lr_multiplier"]): g for g in groups}
    assert set(found) == {(0.1, 0.1), (0.0, 0.1), (0.1, 1.0), (0.0, 1.0), (0.0, 2.0)}
    for (_, multiplier), group in found.items():
        assert group["lr"] == pytest.approx(0.01 * multiplier)
    assert _names(model, found[(0.1, 0.1)]) == {"vision.0.weight"}
    assert _names(model, found[(0.0, 0.1)]) == {"vision.0.bias", "vision.1.weight", "vision.1.bias"}
    # 'vision' is a module prefix: vision_proj keeps the base lr.
    assert _names(model, found[(0.1, 1.0)]) == {"vision_proj.weight", "text.weight"}
    assert _names(model, found[(0.0, 2.0)]) == {"scale"}


def test_param_groups_longest_prefix_wins():
    model = Tiny()
    run = make_run()
    run.optim.lr_multipliers = {"vision": 0.1, "vision.1": 0.5}  # a dotted key, which an override would nest
    groups = param_groups(model, run)
    by_multiplier: dict[float, set[str]] = {}
    for group in groups:
        by_multiplier.setdefault(group["lr_multiplier"], set()).update(_names(model, group))
    assert by_multiplier[0.5] == {"vision.1.weight", "vision.1.bias"}
    assert by_multiplier[0.1] == {"vision.0.weight", "vision.0.bias"}


def test_param_groups_unknown_prefix():
    with pytest.raises(ConfigError) as info:
        param_groups(Tiny(), make_run("+optim.lr_multipliers.visual=0.1"))
    assert str(info.value) == "optim.lr_multipliers: no parameter name starts with 'visual'"


def test_param_groups_prefix_must_end_at_a_dot():
    # 'vis' is the start of names but not a module path.
    with pytest.raises(ConfigError, match="'vis'"):
        param_groups(Tiny(), make_run("+optim.lr_multipliers.vis=0.1"))


def test_param_groups_no_trainable_parameter():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError) as info:
        param_groups(model, make_run())
    assert str(info.value) == "the model has no trainable parameter"


def test_param_groups_skip_frozen_parameters_wherever_they_are():
    model = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 3))
    groups = param_groups(model, make_run())
    assert {id(p) for group in groups for p in group["params"]} == {id(model[1].weight), id(model[1].bias)}


def test_optimizer_is_fused_adamw_with_the_groups_and_the_updates_of_plain_adamw():
    # The trainer's AdamW runs torch's fused kernel on CPU too (3.5x faster a step than foreach):
    # the same groups, and the same parameters after a few steps as the reference implementation.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    reference = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    reference.load_state_dict(model.state_dict())
    run = make_run("optim.lr=1e-2", "optim.weight_decay=0.1", "optim.betas=[0.8,0.95]", "optim.eps=1e-4")
    optimizer = build_optimizer(param_groups(model, run), run)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    plain = torch.optim.AdamW(param_groups(reference, run), lr=1e-2, betas=(0.8, 0.95), eps=1e-4, foreach=False)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [g["weight_decay"] for g in plain.param_groups]
    data = torch.randn(8, 16)
    start = model[0].weight.detach().clone()
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, plain)):
            opt.zero_grad()
            net(data).square().mean().backward()
            opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (model[0].weight - start).abs().max() > 1e-3  # the steps moved the weights


def test_adamw_checks_gradients_only_when_asked():
    assert type(adamw([nn.Parameter(torch.ones(2))], lr=0.1)) is torch.optim.AdamW
    assert type(adamw([nn.Parameter(torch.ones(2))], finite_only=True, lr=0.1)) is FiniteStepAdamW


@pytest.mark.parametrize("stage, precision, finite_only", [("zero0", "fp32", True), ("zero0", "bf16", False),
                                                          ("zero2", "fp32", False), ("zero3", "fp32", False)])
def test_only_an_optimizer_deepspeed_does_not_wrap_checks_its_gradients(stage, precision, finite_only):
    run = make_run(f"deepspeed={stage}", f"trainer.precision={precision}")
    optimizer = build_optimizer(param_groups(nn.Linear(4, 4), run), run)
    assert isinstance(optimizer, FiniteStepAdamW) == finite_only


def test_a_step_with_a_non_finite_gradient_changes_nothing_and_says_overflow():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    run = make_run("deepspeed=zero0", "trainer.precision=fp32", "optim.lr=1e-2")
    optimizer = build_optimizer(param_groups(model, run), run)
    model(torch.randn(3, 4)).sum().backward()
    start = model.weight.detach().clone()
    optimizer.step()
    assert optimizer.overflow is False and not torch.equal(model.weight, start)  # a finite step is taken
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    optimizer.zero_grad()
    (model(torch.randn(3, 4)).sum() * float("inf")).backward()
    model.bias.grad.fill_(1.0)  # one parameter's gradient finite, the other's not: the whole step goes
    optimizer.step()
    assert optimizer.overflow is True
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(optimizer.state[model.weight][k], v) for k, v in moments.items())


# --- lr_lambda --------------------------------------------------------------------------------------


def test_a_one_step_schedule_decays_in_that_step():
    f = lr_lambda(make_run("trainer.max_steps=1", "optim.warmup_steps=0", "optim.schedule=linear", "optim.min_lr_ratio=0.1"))
    assert (f(0), f(1)) == (pytest.approx(1.0), pytest.approx(0.1))


def test_warmup_is_a_linear_ramp():
    f = lr_lambda(make_run("trainer.max_steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.0"))
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)


def test_cosine_reaches_min_lr_ratio_at_max_steps():
    f = lr_lambda(
        make_run("trainer.max_steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "optim.schedule=cosine")
    )
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # flat after the end
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_schedule():
    f = lr_lambda(make_run(
        "trainer.max_steps=100", "optim.schedule=linear", "optim.warmup_steps=0", "optim.min_lr_ratio=0.2"
    ))
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.2 + 0.8 * 0.5)
    assert f(100) == pytest.approx(0.2)


def test_constant_schedule():
    f = lr_lambda(make_run("trainer.max_steps=100", "optim.schedule=constant", "optim.warmup_steps=4"))
    assert f(0) == pytest.approx(0.25)
    assert [f(s) for s in (4, 50, 100, 1000)] == [1.0] * 4


def test_schedule_drives_lambda_lr():
    run = make_run("trainer.max_steps=20", "optim.warmup_steps=5", "optim.lr=0.1", "optim.min_lr_ratio=0.0")
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=run.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run))
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02)
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)


class _HeadAndBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).square().mean()


ENGINE_RUN = ("deepspeed=zero0", "trainer.precision=fp32", "data.batch_size=2", "trainer.global_batch_size=4",
              "trainer.max_steps=6", "optim.warmup_steps=2", "optim.schedule=linear", "optim.lr=0.1",
              "optim.min_lr_ratio=0.0", "+optim.lr_multipliers.head=10")


def _engine_lrs_worker(rank: int, world: int, out: str) -> None:
    # The group is up (tests/gloo.py); DeepSpeed still reads these, as the launcher would set them.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    run = make_run(*ENGINE_RUN)
    torch.manual_seed(0)
    engine = build_engine(_HeadAndBody(), run, deepspeed_config(run, world))
    seen = []
    for _ in range(2 * 7):  # 7 optimizer steps of 2 micro-batches: past max_steps
        engine.backward(engine(torch.randn(2, 3)))
        engine.step()
        seen.append(sorted({(g["lr_multiplier"], g["lr"]) for g in engine.optimizer.param_groups}))
    torch.save(seen, out)


def test_the_engine_applies_the_schedule_per_optimizer_step_and_group(tmp_path):
    # Two micro-batches a step: the lr moves once per optimizer step, not per micro-batch, and each
    # group keeps its multiplier. Linear: warmup 0.05, 0.1 over 2 steps, then down to 0 at step 6.
    out = tmp_path / "lrs.pt"
    run_on_ranks(1, _engine_lrs_worker, str(out))
    seen = torch.load(out)
    factors = [lr_lambda(make_run(*ENGINE_RUN))(step) for step in range(8)]
    assert factors[:7] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    for micro, groups in enumerate(seen):
        steps_done = (micro + 1) // 2
        assert [m for m, _ in groups] == [1.0, 10.0]
        assert [lr for _, lr in groups] == pytest.approx([0.1 * factors[steps_done], 1.0 * factors[steps_done]]), micro
