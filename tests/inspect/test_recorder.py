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
