"""MuonSGD: Muon on conv filters and Nesterov SGD on the rest, as one optimizer."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from cifar_lightning import models
from cifar_lightning.module import ImageClassifier
from cifar_lightning.optim import MuonSGD


def make(net: torch.nn.Module) -> tuple[MuonSGD, torch.optim.lr_scheduler.LambdaLR]:
    filters = [p for p in net.parameters() if p.ndim == 4 and p.requires_grad]
    rest = [p for p in net.parameters() if not (p.ndim == 4 and p.requires_grad)]
    opt = MuonSGD(filters, [{"params": rest}], lr=0.1, momentum=0.85, weight_decay=1e-3, muon_lr=0.2, muon_momentum=0.6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))


def train(net: torch.nn.Module, opt: MuonSGD, sched: object, batches: list[torch.Tensor]) -> None:
    y = torch.arange(len(batches[0])) % 10
    for x in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()


def fast_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("fast", widths=[8, 16, 16]).to(memory_format=torch.channels_last)


def test_state_round_trip_continues_exactly_like_an_unbroken_run() -> None:
    batches = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    net = fast_net(0)
    opt, sched = make(net)
    train(net, opt, sched, batches[:3])
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    train(net, opt, sched, batches[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert set(saved["opt"]) == {"sgd", "muon"} and saved["opt"]["muon"]["state"], "Muon's momenta travel"
    other = fast_net(1)
    other.load_state_dict(saved["net"])
    opt2, sched2 = make(other)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(other, opt2, sched2, batches[3:])
    for (key, a), b in zip(net.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_one_schedule_scales_both_learning_rates_and_the_parts_keep_their_groups() -> None:
    net = fast_net(0)
    opt, sched = make(net)
    opt.step()  # no gradients yet: nothing moves
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.05), pytest.approx(0.1)]
    assert opt.sgd.param_groups[0]["lr"] == pytest.approx(0.05) and opt.muon.param_groups[0]["lr"] == pytest.approx(0.1)


def test_filter_updates_are_scale_free_and_filters_keep_norm_sqrt_out() -> None:
    """Muon's orthogonalised step does not grow with the gradient; each filter bank is brought
    to Frobenius norm sqrt(out) before it (BatchNorm follows, so the scale is free)."""
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 5)
    out = []
    for scale in (1.0, 1000.0):
        p = torch.nn.Parameter(w.detach().clone())
        bias = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
        opt = MuonSGD([p], bias, lr=0.1, momentum=0.5, weight_decay=0.0, muon_lr=0.05, muon_momentum=0.0)
        g = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
        p.grad = g * scale
        opt.step()
        out.append(p.detach().clone())
    assert torch.allclose(out[0], out[1], atol=2e-3)  # Newton-Schulz runs in bf16
    normalised = w.detach() * (8**0.5 / w.detach().norm())
    step = normalised - out[0]
    assert 0.0 < step.norm() <= 0.05 * 8**0.5 * 1.5  # about lr per singular direction, min(8, 36) of them
    assert out[0].norm() == pytest.approx(8**0.5, rel=0.1)


def test_zero_grad_clears_the_filters_too() -> None:
    net = fast_net(0)
    opt, _ = make(net)
    F.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_a_state_of_another_optimizer_is_refused() -> None:
    net = fast_net(0)
    opt, _ = make(net)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="not a MuonSGD"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="4-D"):
        MuonSGD([torch.nn.Parameter(torch.zeros(3, 3))], [], lr=0.1, momentum=0.9, weight_decay=0, muon_lr=0.1, muon_momentum=0.5)


def test_the_module_gives_trainable_filters_to_muon_and_the_rest_to_sgd() -> None:
    module = ImageClassifier(model="fast", optimizer="muon", lr=1.5, norm_bias_lr_scale=64.0, muon_lr=0.3, muon_momentum=0.5)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonSGD)
    trainable_filters = {id(p) for p in module.parameters() if p.ndim == 4 and p.requires_grad}
    assert {id(p) for p in opt.filters} == trainable_filters and trainable_filters
    assert id(module.net.whiten.weight) not in trainable_filters  # fixed whitening, never stepped
    sgd_ids = {id(p) for g in opt.sgd.param_groups for p in g["params"]}
    assert not sgd_ids & trainable_filters
    assert sgd_ids | trainable_filters == {id(p) for p in module.parameters()}
    rest, norm = opt.sgd.param_groups
    assert rest["lr"] == 1.5 and norm["lr"] == 96.0
    assert opt.muon.param_groups[0]["lr"] == 0.3 and opt.muon.param_groups[0]["momentum"] == 0.5
