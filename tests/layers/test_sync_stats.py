"""Synchronized bn statistics across two real gloo processes: they equal one process on the
whole batch, run in the fused node, and compile as one graph (as one process does)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, join_gloo

from enorm_cli.layers import ExemplarNorm2d


def _synced_layer(
    rank: int, port: int, state: dict, channels: int, reduction: int
) -> ExemplarNorm2d:
    """Join the 2-process gloo group; the reference layer's state, with synced statistics."""
    join_gloo(rank, port)
    layer = ExemplarNorm2d(channels, reduction=reduction)
    layer.load_state_dict(state)
    layer.sync_stats = True
    return layer


def _worker(rank: int, port: int, x: torch.Tensor, state: dict, out: dict) -> None:
    layer = _synced_layer(rank, port, state, 8, 2)
    try:
        part = x[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
        y = layer(part)
        (y * torch.arange(y.numel()).view_as(y).sin()[: y.numel()]).sum().backward()
        grads = torch.stack([p.grad.flatten().sum() for p in layer.parameters()])
        dist.all_reduce(grads)
        out[rank] = {
            "y": y.detach(),
            "xgrad": part.grad,
            "grads": grads,
            "mean": layer.running_mean.clone(),
            "var": layer.running_var.clone(),
            "node": type(y.grad_fn).__name__,
            "kernel": y.grad_fn.kernel is not None,
        }
    finally:
        dist.destroy_process_group()


def test_two_process_sync_equals_single_process(en_backend: str) -> None:
    """Through the C++ kernel and through tensor ops (the processes inherit ENORM_NATIVE)."""
    x = torch.randn(6, 8, 4, 4) * 2 + 1
    reference = ExemplarNorm2d(8, reduction=2)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    xr = x.clone().requires_grad_()
    y = reference(xr)
    weights = torch.cat(
        [
            torch.arange(y[:3].numel()).view_as(y[:3]).sin(),
            torch.arange(y[3:].numel()).view_as(y[3:]).sin(),
        ]
    )
    (y * weights).sum().backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(free_port(), x, state, out), nprocs=2, join=True)
    torch.testing.assert_close(
        torch.cat([out[0]["y"], out[1]["y"]]), y.detach(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.cat([out[0]["xgrad"], out[1]["xgrad"]]), xr.grad, rtol=1e-4, atol=1e-5
    )
    expected = torch.stack([p.grad.flatten().sum() for p in reference.parameters()])
    torch.testing.assert_close(out[0]["grads"], expected, rtol=1e-4, atol=1e-4)
    for rank in (0, 1):  # both ranks hold the running statistics of the whole batch
        torch.testing.assert_close(out[rank]["mean"], reference.running_mean)
        torch.testing.assert_close(out[rank]["var"], reference.running_var)
        # the synced path is the one fused node (its backward all-reduces), not autograd
        assert out[rank]["node"] == "ExemplarNormFunctionBackward"
        assert out[rank]["kernel"] == (en_backend == "native")


def _bf16_worker(rank: int, port: int, x: torch.Tensor, state: dict, out: dict) -> None:
    layer = _synced_layer(rank, port, state, 32, 4)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x[rank * 4 : (rank + 1) * 4])
            lam = layer.ratios(x[rank * 4 : (rank + 1) * 4])
        out[rank] = {"y": y.detach(), "lam": lam.detach()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_synced_path_under_bf16_autocast_equals_one_process() -> None:
    """webvision.yaml's path (bf16, several processes): the ratio branch stays float32 there too.

    Before one precision policy, the synced path ran the branch's linear layers in bf16
    while one process (the fused node) ran them in float32: lambda differed by ~1e-2.
    """
    torch.manual_seed(1)
    reference = ExemplarNorm2d(32, reduction=4)
    with torch.no_grad():
        reference.ratio.fc2.weight.normal_(0, 1.0)  # ratios that depend on the input
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    x = torch.randn(8, 32, 6, 6) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = reference(x)
        lam = reference.ratios(x)
    out = mp.Manager().dict()
    mp.spawn(_bf16_worker, args=(free_port(), x, state, out), nprocs=2, join=True)
    assert out[0]["y"].dtype == y.dtype == torch.float32
    torch.testing.assert_close(torch.cat([out[0]["lam"], out[1]["lam"]]), lam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([out[0]["y"], out[1]["y"]]), y, rtol=1e-5, atol=1e-5)


def _converted_mobilenet_v2(bn_stats: str) -> torch.nn.Module:
    """torchvision's MobileNetV2 (random weights), converted, in training mode."""
    import torchvision

    from enorm_cli.config.settings import ENSettings
    from enorm_cli.convert.surgery import replace_norms
    from enorm_cli.layers.modes import set_bn_stats

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    replace_norms(model, ENSettings())
    set_bn_stats(model, bn_stats)
    return model


def _graph_breaks(model: torch.nn.Module) -> tuple[int, int]:
    """(graphs, graph breaks) torch._dynamo.explain finds in one training forward."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: model(x).sum())(torch.randn(4, 3, 32, 32))
    return explained.graph_count, explained.graph_break_count


def _explain_worker(rank: int, port: int, out: dict) -> None:
    from enorm_cli.layers.modes import set_sync_stats

    join_gloo(rank, port)
    try:
        model = _converted_mobilenet_v2("batch")
        set_sync_stats(model, True)
        out[rank] = _graph_breaks(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_converted_mobilenet_v2_compiles_as_one_graph() -> None:
    """One process: no graph break on the fused path (nothing hits torch.compiler.disable)."""
    assert _graph_breaks(_converted_mobilenet_v2("renorm_frozen")) == (1, 0)


@pytest.mark.slow
def test_synced_converted_mobilenet_v2_compiles_as_one_graph() -> None:
    """Two gloo processes with synced statistics: the all-reduces inside the fused node trace
    too, so the multi-process path compiles as one graph as well."""
    out = mp.Manager().dict()
    mp.spawn(_explain_worker, args=(free_port(), out), nprocs=2, join=True)
    assert out[0] == out[1] == (1, 0)
