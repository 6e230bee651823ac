"""V-Net: shapes, the forward contract shared with the U-Net, registry, and that it learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.components.contrastive import unet_bottleneck
from semiseg.models import build_model
from semiseg.models.vnet import ResidualStage, VNet


def _vnet(depth=2, width=4, kernel_size=3, norm="batch", dropout=0.0, in_channels=1, num_classes=3):
    torch.manual_seed(0)
    return VNet(dims=3, in_channels=in_channels, num_classes=num_classes, depth=depth, width=width,
                dropout=dropout, norm=norm, kernel_size=kernel_size)


@pytest.mark.parametrize("depth, shape", [(1, (5, 7, 4)), (2, (8, 8, 8)), (2, (9, 13, 6)), (3, (17, 8, 11))])
def test_logits_have_the_input_size_for_any_depth_and_odd_sizes(depth, shape):
    net = _vnet(depth=depth).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 1, *shape))
    assert logits.shape == (2, 3, *shape)
    assert torch.isfinite(logits).all()


def test_return_features_gives_the_maps_the_head_classifies():
    net = _vnet(width=4).eval()
    x = torch.randn(1, 1, 12, 10, 9)
    with torch.no_grad():
        logits, features = net(x, return_features=True)
        plain = net(x)
    assert features.shape == (1, net.feature_channels, 12, 10, 9)
    assert net.feature_channels == 8
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(net.head(features), logits)


def test_encode_only_returns_the_bottleneck_and_works_with_the_contrastive_helper():
    net = _vnet(depth=3, width=4).eval()
    x = torch.randn(2, 1, 16, 17, 8)
    with torch.no_grad():
        bottleneck = net(x, encode_only=True)
        helper = unet_bottleneck(net, x)
    assert bottleneck.shape == (2, 4 * 2 ** 3, 2, 2, 1)
    torch.testing.assert_close(helper, bottleneck)
    assert net.depth == 3 and len(net.encoders) == 4 and len(net.pool) == 3


def test_paper_configuration_stage_layout():
    net = VNet(dims=3, in_channels=1, num_classes=2, depth=4, width=16, norm="none")
    def convs(stage):
        return [m for m in stage.convs if isinstance(m, nn.Conv3d)]
    assert [len(convs(s)) for s in net.encoders] == [1, 2, 3, 3, 3]
    assert [len(convs(s)) for s in net.decoders] == [3, 3, 2, 1]
    assert [convs(s)[0].out_channels for s in net.encoders] == [16, 32, 64, 128, 256]
    assert [convs(s)[0].out_channels for s in net.decoders] == [256, 128, 64, 32]
    assert all(c.kernel_size == (5, 5, 5) for s in net.encoders for c in convs(s))
    assert all(d[0].kernel_size == (2, 2, 2) and d[0].stride == (2, 2, 2) for d in net.downs)
    assert all(isinstance(u[0], nn.ConvTranspose3d) and u[0].stride == (2, 2, 2) for u in net.ups)
    assert any(isinstance(m, nn.PReLU) for m in net.modules())


def test_residual_stage_adds_its_input():
    torch.manual_seed(0)
    stage = ResidualStage(4, 4, 2, 3, "none", 0.0)
    for module in stage.convs:
        if isinstance(module, nn.Conv3d):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    x = torch.rand(1, 4, 5, 5, 5)
    torch.testing.assert_close(stage(x), x)
    repeat = ResidualStage(1, 3, 1, 3, "none", 0.0)
    nn.init.zeros_(repeat.convs[0].weight)
    nn.init.zeros_(repeat.convs[0].bias)
    y = torch.rand(1, 1, 4, 4, 4)
    torch.testing.assert_close(repeat(y), y.repeat(1, 3, 1, 1, 1))


def test_registry_builds_it_by_name_with_the_paper_kernel():
    net = build_model("vnet", dims=3, in_channels=2, num_classes=4, depth=2, width=4, dropout=0.1, norm="instance")
    assert isinstance(net, VNet)
    assert net.kernel_size == 5
    assert net(torch.randn(1, 2, 8, 8, 8)).shape == (1, 4, 8, 8, 8)
    assert any(isinstance(m, nn.Dropout3d) for m in net.modules())


@pytest.mark.parametrize("kwargs, message", [({"dims": 2}, "3D"), ({"depth": 0}, "depth"),
                                             ({"kernel_size": 4}, "kernel_size")])
def test_invalid_arguments_raise(kwargs, message):
    arguments = {"dims": 3, "in_channels": 1, "num_classes": 2, "depth": 2, "width": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        VNet(**arguments)


def test_dims_2_raises_through_the_registry():
    with pytest.raises(ValueError, match="data.dims = 3"):
        build_model("vnet", dims=2, in_channels=1, num_classes=2, depth=2, width=4, dropout=0.0, norm="batch")


def test_too_small_or_2d_input_raises_a_clear_error():
    net = _vnet(depth=3)
    with pytest.raises(ValueError, match=">= 8"):
        net(torch.randn(1, 1, 16, 16, 4))
    with pytest.raises(ValueError, match=r"\[B, C, X, Y, Z\]"):
        net(torch.randn(1, 1, 16, 16))


def test_a_few_optimiser_steps_reduce_the_loss_on_a_toy_task():
    torch.manual_seed(0)
    net = _vnet(depth=2, width=4, num_classes=2, norm="instance")
    images = torch.randn(2, 1, 12, 12, 12)
    labels = (F.avg_pool3d(images, 3, stride=1, padding=1) > 0).long()[:, 0]
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
