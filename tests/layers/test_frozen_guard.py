"""renorm_frozen's guard (``statistics.watch_frozen_stats`` in ``MixedNorm2d``): frozen
statistics while the features fit them, batch statistics once they run away."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_paths_agree, frozen_layer

from enorm_cli.layers import ExemplarNorm2d, SwitchableNorm2d, fused_en
from enorm_cli.layers.statistics import FROZEN_STALE, FROZEN_WATCHING, STALE_LIMIT


def batches(scales: list[float], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, 2, 2, generator=gen) * s for s in scales]


@pytest.mark.parametrize("cls", [ExemplarNorm2d, SwitchableNorm2d])
def test_statistics_stay_frozen_while_the_features_fit_them(cls: type) -> None:
    """40 steps of a new domain (r about 0.2 from the first step) and one odd batch with 5
    times the spread: no trip, the source's statistics untouched, training computes eval's
    function."""
    layer = frozen_layer(cls)
    scales = [1.0] * 20 + [5.0] + [1.0] * 19
    for x in batches(scales):
        with torch.no_grad():
            y = layer(x)
    assert layer.frozen_state.item() == FROZEN_WATCHING
    assert (layer.running_var == 25.0).all() and (layer.running_mean == 0.3).all()
    assert layer.num_batches_tracked.item() == 0
    torch.testing.assert_close(y, layer.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_runaway_features_trip_it_into_batch_statistics(fused: bool) -> None:
    """Features that grow 1.5 times a step (a too-high lr on frozen statistics) trip the
    guard within a few steps; from then on the bn member is BatchNorm's batch statistics,
    the running ones follow, and the verdict holds when the features calm down."""
    layer = frozen_layer(normalizers=("bn",))
    grow = [1.5**i for i in range(12)]
    tripped_at = None
    with fused_en(fused):
        for step, x in enumerate(batches(grow)):
            layer(x.requires_grad_()).sum().backward()
            if tripped_at is None and layer.frozen_state.item() == FROZEN_STALE:
                tripped_at = step
        assert tripped_at is not None and 1.5**tripped_at > STALE_LIMIT
        assert tripped_at < 10
        assert layer.num_batches_tracked.item() > 0 and (layer.running_var != 25.0).all()
        (x,) = batches([1.0], seed=1)
        y = layer(x)
    expected = torch.nn.functional.batch_norm(
        x, None, None, layer.weight[0], layer.bias[0], training=True, eps=layer.eps
    )
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert layer.frozen_state.item() == FROZEN_STALE


def test_fused_node_equals_autograd_once_tripped() -> None:
    """Both paths read the verdict: same output, input and parameter gradients."""
    torch.manual_seed(0)
    base = frozen_layer()
    base.frozen_state.fill_(FROZEN_STALE)
    (x,) = batches([2.0])
    results = []
    for fused in (True, False):
        layer = frozen_layer()
        layer.load_state_dict(base.state_dict())
        xi = x.clone().requires_grad_()
        with fused_en(fused):
            y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, xi.grad, [p.grad for p in layer.parameters()], layer.running_var))
    assert_paths_agree(results)


@pytest.mark.parametrize("cls", [ExemplarNorm2d, SwitchableNorm2d])
def test_the_verdict_is_state_and_older_state_dicts_load(cls: type) -> None:
    """A resumed run keeps the guard's verdict (it is in the state dict); a state dict from
    before the guard (older version metadata, or none as in safetensors) loads strictly with
    a fresh guard, while a current one must carry the buffers."""
    layer = frozen_layer(cls)
    layer.frozen_state.fill_(FROZEN_STALE)
    again = frozen_layer(cls)
    again.load_state_dict(layer.state_dict(), strict=True)
    assert again.frozen_state.item() == FROZEN_STALE
    old = layer.state_dict()
    for key in ("frozen_log_r", "frozen_state"):
        del old[key]
    old._metadata[""]["version"] = cls._version - 1
    for state in (old, dict(old)):
        fresh = frozen_layer(cls)
        fresh.frozen_state.fill_(FROZEN_STALE)
        fresh.load_state_dict(state, strict=True)
        assert fresh.frozen_state.item() == 0 and not fresh.frozen_log_r.any()
    old._metadata[""]["version"] = cls._version
    with pytest.raises(RuntimeError, match="frozen_state"):
        frozen_layer(cls).load_state_dict(old, strict=True)
