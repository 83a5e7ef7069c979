from __future__ import annotations

import pytest
import torch

from cifar_lightning import models


def test_seed_network_maps_images_to_ten_logits() -> None:
    net = models.build("seed").eval()
    out = net(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10)
    assert models.build("seed", num_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_seed_network_has_the_keras_notebooks_parameter_count() -> None:
    # Keras model.summary() of the notebook's network: 896 + 9,248 + 18,496 + 36,928
    # + 2,097,664 + 5,130 trainable parameters.
    net = models.build("seed")
    assert sum(p.numel() for p in net.parameters()) == 2_168_362
    kinds = [type(m).__name__ for m in net.modules() if not isinstance(m, torch.nn.Sequential)][1:]
    assert kinds == [
        "Conv2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "ByteDropout",
        "Conv2d", "ReLU", "Conv2d", "ReLU", "AvgPool2d", "ByteDropout",
        "Flatten", "Linear", "ReLU", "ByteDropout", "Linear",
    ]  # fmt: skip
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25, 0.5]


def test_seed_network_pools_before_its_second_relu_with_the_notebooks_function() -> None:
    """ReLU after the max-pool (cheaper) computes what the notebook's ReLU-then-pool computes:
    the same outputs and the same gradients for the same weights."""
    torch.manual_seed(0)
    net = models.build("seed").eval()
    # the parameters keep the indices they had before the reorder: old checkpoints load
    assert [k for k in net.state_dict() if k.endswith("weight")] == [
        "features.0.weight", "features.2.weight", "features.6.weight", "features.8.weight", "head.1.weight", "head.4.weight"]
    f = net.features
    notebook = torch.nn.Sequential(f[0], f[1], f[2], torch.nn.ReLU(), torch.nn.MaxPool2d(2), *f[5:], net.head).eval()
    x = torch.randn(8, 3, 32, 32)
    out = net(x)
    ref = notebook(x)
    assert torch.equal(out, ref)
    grads = [torch.autograd.grad(m(x).square().sum(), f[2].weight)[0] for m in (net, notebook)]
    torch.testing.assert_close(grads[0], grads[1])


def test_seed_network_hands_its_pool_an_nhwc_gradient_with_the_same_values() -> None:
    """In training the flatten's NCHW gradient is turned NHWC before it reaches the average
    pool (whose bf16 backward is several times slower on a mismatched layout): every gradient
    is unchanged, and eval and export run the plain forward."""
    torch.manual_seed(0)
    net = models.build("seed").train().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    seen = []
    hook = net.features[10].register_full_backward_hook(lambda m, gi, go: seen.append(go[0]))

    def grads() -> list[torch.Tensor]:
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", torch.bfloat16):
            loss = net(x).float().square().sum()
        return list(torch.autograd.grad(loss, list(net.parameters())))

    ours = grads()
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)
    plain = models._ChannelsLastGrad.apply
    try:
        models._ChannelsLastGrad.apply = staticmethod(lambda t: t)
        before = grads()
    finally:
        models._ChannelsLastGrad.apply = plain
    assert not seen[-1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours, before, strict=True):
        assert torch.equal(a, b)
    hook.remove()
    with torch.no_grad():
        net.eval()(x)
    assert torch.jit.trace(net.eval(), x).graph.findNode("prim::PythonOp") is None


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_byte_dropout_keeps_each_element_with_probability_one_minus_p(p: float) -> None:
    drop = models.ByteDropout(p).train()
    x = torch.ones(64, 32, 16, 16)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # every byte of each 64-bit draw is used: a draw with its top bit fixed would drop (or keep)
    # every eighth element
    by_byte = kept.flatten().view(-1, 8).float().mean(0)
    assert (by_byte - (1 - p)).abs().max() < 0.01, by_byte


def test_byte_dropout_is_seeded_follows_the_memory_format_and_passes_gradients_through_the_mask() -> None:
    drop = models.ByteDropout(0.25).train()
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b)
    assert a.is_contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(a.sum(), x)
    torch.testing.assert_close(g, (a != 0).float() / 0.75)
    assert torch.equal(drop.eval()(x), x)


def test_byte_dropout_falls_back_to_torch_where_bytes_cannot_express_p() -> None:
    torch.manual_seed(0)
    y = models.ByteDropout(0.3).train()(torch.ones(100_000))
    assert abs((y != 0).float().mean().item() - 0.7) < 0.01


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9000'; choose from .*seed"):
        models.build("resnet9000")
