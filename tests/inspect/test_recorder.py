"""RatioRecorder: hooks record exactly the ratios forward used, and change nothing."""

from __future__ import annotations

import copy

import timm
import torch

from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.surgery import replace_norms
from enorm_cli.inspect.recorder import RatioRecorder, summarize


def _converted(settings: ENSettings) -> torch.nn.Module:
    model = timm.create_model("test_resnet")
    replace_norms(model, settings)
    with torch.no_grad():  # move the branch off its constant start, so ratios differ per sample
        for name, p in model.named_parameters():
            if "fc2.weight" in name or "mean_weight" in name:
                p.normal_(0, 0.5)
    return model.eval()


def test_recorded_ratios_are_what_forward_used() -> None:
    model = _converted(ENSettings())
    x = torch.randn(5, 3, 32, 32)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
        for n, m in model.named_modules()
        if hasattr(m, "ratios")
    ]
    with torch.no_grad():
        plain = model(x)
        with RatioRecorder(model) as recorder:
            hooked = model(x)
            lam = recorder.take()
    for h in handles:
        h.remove()
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    assert lam.shape == (5, len(recorder.names), 3)
    for i, (name, module) in enumerate(recorder.layers):
        torch.testing.assert_close(lam[:, i], module.ratios(inputs[name]))
    assert lam.std(0).max() > 1e-3  # per sample
    stats = summarize(recorder.names, recorder.normalizers, lam)
    assert all(abs(sum(layer["mean"]) - 1) < 1e-5 for layer in stats["layers"])


def test_sn_ratios_are_static() -> None:
    model = _converted(ENSettings(layer="sn"))
    with torch.no_grad(), RatioRecorder(copy.deepcopy(model)) as recorder:
        recorder.model(torch.randn(3, 3, 32, 32))
        lam = recorder.take()
    assert lam.std(0).max() == 0 and torch.allclose(lam.sum(-1), torch.ones(3, lam.shape[1]))


def test_diagnostics_tell_a_fixed_mixture_from_a_choosing_layer() -> None:
    """After a conversion: no spread over samples; every gamma the source's (anchored) or the
    other normalizers' inert (the paper-style start). With FC2's weight drawn: a spread. With
    the hidden layer saturated: the same h, so the same mix, for every sample."""
    import timm

    import enorm_cli
    from enorm_cli.inspect.recorder import (
        RatioRecorder,
        layer_ratios,
        selection_scalars,
        summarize,
    )

    model = enorm_cli.convert_model(timm.create_model("test_resnet")).eval()
    layers = [m for m in model.modules() if isinstance(m, enorm_cli.ExemplarNorm2d)]
    x = torch.randn(16, 3, 64, 64)

    def readout():
        with RatioRecorder(model) as recorder, torch.no_grad():
            model(x)
        r = recorder.take_readout()
        gamma = recorder.gamma_sizes()
        return recorder, r, layer_ratios(recorder.names, recorder.normalizers, *r, gamma)

    recorder, r, rows = readout()
    assert all(row.spread == 0 and max(row.logit_std) < 1e-6 for row in rows)
    # anchored: every normalizer carries the source's gamma (a residual's last may be 0)
    assert all(row.gamma_rel in ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) for row in rows)
    assert any(row.gamma_rel == [1.0, 1.0, 1.0] for row in rows)
    paper = enorm_cli.convert_model(timm.create_model("test_resnet"), anchored=False).eval()
    with RatioRecorder(paper) as paper_recorder:
        pass
    assert all(g[1:] == [0.0, 0.0] for g in paper_recorder.gamma_sizes())  # in, ln inert
    assert all(row.saturated is not None and row.saturated < 0.5 for row in rows)
    with torch.no_grad():
        for m in layers:
            m.ratio.fc2.weight.normal_(0, 10)
            m.weight[1:].fill_(0.5)
    recorder, r, rows = readout()
    assert all(row.spread > 0 and max(row.logit_std) > 0 for row in rows)
    assert all(row.gamma_rel[1] > 0 for row in rows)
    with torch.no_grad():
        for m in layers:
            m.ratio.fc1.bias.fill_(10.0)  # tanh(10 + ...): flat
    recorder, r, rows = readout()
    assert all(row.saturated == 1.0 and row.spread < 1e-6 for row in rows)
    scalars = selection_scalars(
        summarize(recorder.names, recorder.normalizers, r, recorder.gamma_sizes())
    )
    assert scalars["saturated"] == 1.0 and scalars["gamma_other"] > 0
    assert set(scalars) == {"ratio_spread", "logit_spread", "saturated", "gamma_other"}
