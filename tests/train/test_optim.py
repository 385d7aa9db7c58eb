import math

import pytest
import torch

from vitkit.models import create_model, freeze_blocks
from vitkit.train.config import TrainConfig
from vitkit.train.optim import EMA, build_optimizer, build_scheduler, lr_factor, param_groups


def test_warmup_then_cosine():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    spe = 5
    assert lr_factor(0, spe, cfg) == pytest.approx(1 / 10)
    assert lr_factor(9, spe, cfg) == pytest.approx(1.0)
    assert lr_factor(10, spe, cfg) == pytest.approx(1.0)  # first step after warmup: cos(0)
    mid = 10 + 20
    assert lr_factor(mid, spe, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lr_factor(49, spe, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_step_schedule_of_seed_000():
    cfg = TrainConfig(epochs=30, warmup_epochs=0, schedule="step", step_size=10, gamma=0.1)
    factors = [lr_factor(e * 7, 7, cfg) for e in range(30)]
    assert factors == pytest.approx([0.1 ** (e // 10) for e in range(30)])


def test_multistep_schedule_of_seed_003():
    cfg = TrainConfig(epochs=200, warmup_epochs=0, schedule="multistep", milestones=[100, 150], gamma=0.1)
    for epoch, expected in [(0, 1.0), (99, 1.0), (100, 0.1), (149, 0.1), (150, 0.01), (199, 0.01)]:
        assert lr_factor(epoch * 3 + 2, 3, cfg) == pytest.approx(expected)


def test_scheduler_sets_the_optimizer_rate():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, lr=0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, 2, cfg)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.5 * lr_factor(s, 2, cfg) for s in range(8)])


def test_groups_apart_follow_a_schedule_of_their_own_then_stay_at_zero():
    model = create_model("vit_digits")
    cfg = TrainConfig(epochs=6, warmup_epochs=1, lr=0.5)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"), apart=("head.", "norm."))
    names = {id(p): n for n, p in model.named_parameters()}
    apart = [g for g in optimizer.param_groups if g.get("apart")]
    assert {names[id(p)] for g in apart for p in g["params"]} == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    assert optimizer.param_groups[:len(optimizer.param_groups) - len(apart)] == [
        g for g in optimizer.param_groups if not g.get("apart")]  # the others first: [0] is still the main rate
    scheduler = build_scheduler(optimizer, 3, cfg, apart_epochs=2)
    short = TrainConfig(epochs=2, warmup_epochs=1, lr=0.5)  # a run as long as the apart groups learn
    for step in range(18):
        main_rate = 0.5 * lr_factor(step, 3, cfg)
        apart_rate = 0.5 * lr_factor(step, 3, short) if step < 6 else 0.0
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(apart_rate if g.get("apart") else main_rate), step
        optimizer.step()
        scheduler.step()


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = create_model("vit_digits")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n or n in ("cls_token", "pos_embed") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_layer_decay_scales_each_layer_and_frozen_parameters_are_left_out():
    model = create_model("vit_digits")  # 4 blocks
    freeze_blocks(model, 1)
    cfg = TrainConfig(lr=0.1, layer_decay=0.5, pretrained="weights.safetensors", freeze_blocks=1)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert optimizer.param_groups[0]["lr"] == 0.1  # the head's rate first: the one the log shows
    assert lr[id(names["head.weight"])] == lr[id(names["norm.bias"])] == 0.1
    for i in (1, 2, 3):  # block i of 4 at lr·0.5^(4-i)
        assert lr[id(names[f"blocks.{i}.mlp.fc1.weight"])] == pytest.approx(0.1 * 0.5 ** (4 - i))
    frozen = [n for n in names if n.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0."))]
    assert frozen and not any(id(names[n]) in lr for n in frozen)
    assert len(lr) == len(names) - len(frozen)
    scales = {g["lr_scale"] for g in param_groups(create_model("vit_digits"), 0.05, 0.5)}
    assert min(scales) == 0.5**5  # patch and position embeddings and class token, when trained


def test_ema_follows_the_formula():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1.0))
