"""The CPU SyncBatchNorm across two real gloo processes equals BatchNorm on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, join_gloo
from torch import nn

from enorm_cli.finetune.model import sync_batchnorm
from enorm_cli.layers.cpu_sync_batchnorm import CpuSyncBatchNorm2d, cpu_syncable


def _loss_weights(y: torch.Tensor) -> torch.Tensor:
    return torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()


def _worker(
    rank: int, port: int, x: torch.Tensor, sizes: list[int], state: dict, out: dict
) -> None:
    join_gloo(rank, port)
    try:
        layer = cpu_syncable(nn.BatchNorm2d(5))
        layer.load_state_dict(state)
        start = sum(sizes[:rank])
        part = x[start : start + sizes[rank]].clone().requires_grad_()
        y = layer(part)
        (y * _loss_weights(y)).sum().backward()
        grads = torch.cat([layer.weight.grad, layer.bias.grad])
        dist.all_reduce(grads)
        out[rank] = {
            "y": y.detach(),
            "xgrad": part.grad,
            "grads": grads,
            "mean": layer.running_mean.clone(),
            "var": layer.running_var.clone(),
            "type": type(layer).__name__,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 3], [2, 5]])
def test_two_processes_equal_batchnorm_on_the_whole_batch(sizes: list[int]) -> None:
    """Forward, input and parameter gradients and running statistics, with unequal local
    batches too (the pooled variance must weight each process by its count)."""
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), 5, 4, 3) * 3 + 2
    reference = nn.BatchNorm2d(5)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    xr = x.clone().requires_grad_()
    y = reference(xr)
    parts = torch.split(y, sizes)
    (y * torch.cat([_loss_weights(p) for p in parts])).sum().backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), x, sizes, state, out), nprocs=2, join=True)
    assert out[0]["type"] == "CpuSyncBatchNorm2d"
    torch.testing.assert_close(torch.cat([out[0]["y"], out[1]["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([out[0]["xgrad"], out[1]["xgrad"]]), xr.grad)
    torch.testing.assert_close(
        out[0]["grads"], torch.cat([reference.weight.grad, reference.bias.grad])
    )
    for rank in (0, 1):
        torch.testing.assert_close(out[rank]["mean"], reference.running_mean)
        torch.testing.assert_close(out[rank]["var"], reference.running_var)


def test_one_process_and_eval_are_batchnorm() -> None:
    """Without a process group (or in eval) the layer is torch's BatchNorm, bit for bit."""
    torch.manual_seed(1)
    x = torch.randn(4, 5, 3, 3)
    bn = nn.BatchNorm2d(5)
    layer = cpu_syncable(nn.BatchNorm2d(5))
    assert isinstance(layer, CpuSyncBatchNorm2d)
    assert torch.equal(layer(x), bn(x))
    assert torch.equal(layer.running_var, bn.running_var)
    layer.eval(), bn.eval()
    assert torch.equal(layer(x), bn(x))


def test_the_batchnorm_baseline_syncs_where_en_would() -> None:
    """model.norm=bn follows EN's sync rule on every device: torch's and timm's norm+act
    layers become synced ones (on CPU not nn.SyncBatchNorm, which DDP refuses there), state
    dict keys unchanged (checkpoints load into plain BN)."""
    import timm
    import torchvision
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct

    tv = torchvision.models.mobilenet_v2(num_classes=3)
    before = tv.state_dict().keys()
    synced = sync_batchnorm(tv, "cpu")
    assert any(isinstance(m, CpuSyncBatchNorm2d) for m in synced.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert synced.state_dict().keys() == before
    on_gpu = sync_batchnorm(torchvision.models.mobilenet_v2(num_classes=3), "cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in on_gpu.modules())
    model = sync_batchnorm(timm.create_model("test_efficientnet", num_classes=3), "cpu")
    acts = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert acts and all(type(m).__name__ == "CpuSyncBatchNormAct2d" for m in acts)
    gpu_model = sync_batchnorm(timm.create_model("test_efficientnet", num_classes=3), "cuda")
    assert any(isinstance(m, SyncBatchNormAct) for m in gpu_model.modules())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference = timm.create_model("test_efficientnet", num_classes=3)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    assert torch.equal(model(x), reference(x))  # norm, drop and act as before
