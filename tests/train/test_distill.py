"""Distillation: the losses against hand-written formulas, the teacher's input, training runs with a teacher,
and ResNet-18 as a trainable architecture (and teacher)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_vit
from vitkit.errors import VitkitError
from vitkit.train import TrainConfig, Trainer, build_config, load_model, read_info, train
from vitkit.train.checkpoint import save_model
from vitkit.train.distill import Distiller, hard_distillation_loss, soft_distillation_loss
from vitkit.train.optim import param_groups


def small_student(**overrides) -> TrainConfig:
    base = dict(data="digits", model="vit_digits", dim=32, depth=1, heads=2, mlp_dim=64, epochs=1, batch_size=128,
                lr=5e-3, warmup_epochs=0, device="cpu")
    return TrainConfig(**{**base, **overrides})


def test_soft_loss_is_hintons_formula_and_zero_for_the_teacher_itself():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    T = 2.5
    p_t = (teacher / T).softmax(1)
    by_hand = T**2 * (p_t * ((teacher / T).log_softmax(1) - (student / T).log_softmax(1))).sum() / 5
    torch.testing.assert_close(soft_distillation_loss(student, teacher, T), by_hand)
    assert soft_distillation_loss(teacher, teacher, T).abs() < 1e-6
    assert soft_distillation_loss(student.bfloat16(), teacher.bfloat16(), T).dtype == torch.float32


def test_hard_loss_is_the_cross_entropy_to_the_teachers_top_class():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    top = teacher.argmax(1)
    by_hand = -torch.stack([student[i].log_softmax(0)[top[i]] for i in range(6)]).mean()
    torch.testing.assert_close(hard_distillation_loss(student, teacher), by_hand)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distiller_mixes_the_label_loss_and_the_distillation_term(kind):
    student = tiny_vit(0, distill_token=kind == "hard")
    if kind == "hard":
        torch.nn.init.normal_(student.head_dist.weight)
    teacher = tiny_vit(1)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    distiller = Distiller(student, mean, std, teacher, mean, std, kind=kind, alpha=0.3, temperature=2.0,
                          label_smoothing=0.1)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    loss, logits = distiller(student, x, y)
    with torch.no_grad():
        t = teacher(x)
    if kind == "hard":
        cls, dist = student(x, both_heads=True).unbind(1)
        term = F.cross_entropy(dist, t.argmax(1))
    else:
        cls = student(x)
        term = 4.0 * F.kl_div((cls / 2).log_softmax(1), (t / 2).softmax(1), reduction="batchmean")
    expected = 0.7 * F.cross_entropy(cls, y, label_smoothing=0.1) + 0.3 * term
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, student(x))  # the prediction: for hard, the mean of the two heads
    loss.backward()
    assert student.head.weight.grad is not None and not any(p.grad is not None for p in teacher.parameters())


def test_teacher_with_other_statistics_sees_the_same_pixels():
    student, teacher = tiny_vit(0), tiny_vit(1)
    mean, std, t_mean, t_std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), (0.1, 0.2, 0.3), (0.5, 0.5, 0.4)
    distiller = Distiller(student, mean, std, teacher, t_mean, t_std)
    pixels = torch.rand(4, 3, 8, 8)
    x = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    expected = teacher((pixels - torch.tensor(t_mean)[:, None, None]) / torch.tensor(t_std)[:, None, None])
    torch.testing.assert_close(distiller.teacher_logits(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_training_with_a_teacher(tmp_path, digits_teacher, kind):
    cfg = small_student(teacher=str(digits_teacher), distill=kind if kind == "hard" else None, mixup=0.2)
    assert cfg.distill == kind  # soft is the default with a teacher
    summary = train(cfg, tmp_path, progress=False)
    assert 0 <= summary["test_accuracy"] <= 1
    model, info = load_model(tmp_path)
    assert model.cfg.distill_token == (kind == "hard") and info["arch"] == "vit"


def test_distillation_errors_name_the_fix(tmp_path, digits_teacher):
    with pytest.raises(VitkitError, match="--teacher: checkpoint .* does not exist"):
        Trainer(small_student(teacher=str(tmp_path / "missing")), tmp_path / "run", progress=False)
    # A teacher of four classes for the ten digits.
    teacher_info = read_info(digits_teacher)
    save_model(tmp_path / "four.safetensors", tiny_vit(0, in_channels=1).state_dict(),
               {**teacher_info, "model": tiny_vit(0, in_channels=1).cfg.to_dict(), "classes": list("abcd")})
    with pytest.raises(VitkitError, match="predicts 4 classes .* the data has 10"):
        Trainer(small_student(teacher=str(tmp_path / "four.safetensors")), tmp_path / "run", progress=False)
    with pytest.raises(VitkitError, match="ResNet has not: use --distill soft"):
        small_student(model="resnet18", dim=None, depth=None, heads=None, mlp_dim=None, distill="hard",
                      teacher=str(digits_teacher))
    with pytest.raises(VitkitError, match="pass --teacher"):
        build_config("cifar10-fast-distilled")
    with pytest.raises(VitkitError, match="unknown --distill"):
        small_student(teacher=str(digits_teacher), distill="medium")


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet")
    cfg = TrainConfig(data="digits", model="resnet18", epochs=1, batch_size=256, optimizer="sgd", lr=0.1,
                      weight_decay=5e-4, warmup_epochs=0, val_fraction=0.0, device="cpu")
    trainer = Trainer(cfg, out, progress=False)
    trainer.fit()
    return out, trainer


def test_resnet_trains_and_its_checkpoint_rebuilds_it(resnet_run):
    out, trainer = resnet_run
    info = read_info(out)
    assert info["arch"] == "resnet18"
    assert info["model"] == {"num_classes": 10, "in_channels": 1, "cifar_stem": True, "image_size": 8}
    model, _ = load_model(out)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.model.eval()(x))
    assert set(load_file(out / "last.safetensors")) == set(trainer.model.state_dict())


def test_resnet_decays_only_weights_of_convolutions_and_the_classifier(resnet_run):
    model = resnet_run[1].model
    decayed, not_decayed = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 5e-4 and not_decayed["weight_decay"] == 0
    assert {names[id(p)] for p in decayed["params"]} == {n for n, p in model.named_parameters() if p.ndim > 1}
    assert {"bn1.weight", "layer1.0.bn2.bias", "fc.bias"} <= {names[id(p)] for p in not_decayed["params"]}
    with pytest.raises(VitkitError, match="needs a ViT"):
        param_groups(model, 5e-4, layer_decay=0.8)


def test_resnet_teaches_a_vit(tmp_path, resnet_run):
    summary = train(small_student(teacher=str(resnet_run[0]), val_fraction=0.0), tmp_path, progress=False)
    assert 0 <= summary["test_accuracy"] <= 1


def test_vit_only_options_are_refused_for_a_resnet():
    with pytest.raises(VitkitError, match="--dim, --pool only apply to ViTs"):
        TrainConfig(model="resnet18", dim=64, pool="mean")
    with pytest.raises(VitkitError, match="--layer-decay"):
        TrainConfig(model="resnet18", layer_decay=0.7)
