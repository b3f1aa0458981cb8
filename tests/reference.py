"""Float64 references written straight from the papers' equations, for the layer tests.

Deliberately naive: every normalizer's statistics by its own two-pass reduction
over X, K materialized normalized copies of X, and the mix of the affine outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIMS = {"bn": (0, 2, 3), "in": (2, 3), "ln": (1, 2, 3)}


def stats64(x: Tensor, name: str, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of one normalizer, broadcastable to x (float64)."""
    if name == "gn":
        n, c, h, w = x.shape
        g = x.reshape(n, num_groups, c // num_groups, h, w)
        mean = g.mean(dim=(2, 3, 4), keepdim=True)
        var = (g - mean).square().mean(dim=(2, 3, 4), keepdim=True)
        expand = (n, num_groups, c // num_groups, 1, 1)
        return mean.expand(expand).reshape(n, c, 1, 1), var.expand(expand).reshape(n, c, 1, 1)
    mean = x.mean(dim=DIMS[name], keepdim=True)
    var = (x - mean).square().mean(dim=DIMS[name], keepdim=True)
    return mean, var


def en_reference(layer, x: Tensor, lam: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """EN output and lambda in float64 from the paper's equations, in the layer's mode.

    Eval mode takes bn statistics from the layer's running buffers. ``lam``
    replaces the ratio branch (to check that forward used ``ratios(x)``).
    """
    x = x.double()
    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    stats = []
    for name in layer.normalizers:
        if name == "bn" and not layer.training:
            stats.append((p["running_mean"].view(1, -1, 1, 1), p["running_var"].view(1, -1, 1, 1)))
        else:
            stats.append(stats64(x, name, layer.num_groups))
    xhats = [(x - m) / torch.sqrt(v + layer.eps) for m, v in stats]
    if lam is None:
        pooled = x.mean(dim=(2, 3))  # N x C, mu_in
        xhat_pooled = torch.stack(
            [
                (pooled - m.reshape(m.shape[0], -1))
                / torch.sqrt(v.reshape(v.shape[0], -1) + layer.eps)
                for m, v in stats
            ],
            dim=1,
        )  # N x K x C
        if layer.use_conv:
            w = p["ratio.conv.weight"]  # G x C/G x 1
            g = w.shape[0]
            n, k, c = xhat_pooled.shape
            grouped = xhat_pooled.reshape(n, k, g, c // g)
            z = (grouped * w.squeeze(-1).view(1, 1, g, c // g)).sum(-1)  # N x K x G
        else:
            z = xhat_pooled
        v = torch.einsum("nkc,njc->nkj", z, z).flatten(1)
        h = v @ p["ratio.fc1.weight"].T + p["ratio.fc1.bias"]
        h = torch.tanh(h) if layer.activation == "tanh" else torch.relu(h)
        bias = p["ratio.fc2.bias"]
        if "ratio.hidden_mean" in p:  # the centered branch: b + u + s W (h - c)
            h = h - p["ratio.hidden_mean"]
            bias = bias + p["ratio.logit_shift"]
        logits = layer.logit_scale * (h @ p["ratio.fc2.weight"].T) + bias
        lam = torch.softmax(logits, dim=1)
    lam = lam.double()
    mix = lam + p["mix_offset"] if "mix_offset" in p else lam  # an anchored start's weights
    gamma = p["weight"].expand(len(layer.normalizers), -1)
    beta = p["bias"].expand(len(layer.normalizers), -1)
    y = sum(
        mix[:, k].view(-1, 1, 1, 1)
        * (gamma[k].view(1, -1, 1, 1) * xhats[k] + beta[k].view(1, -1, 1, 1))
        for k in range(len(layer.normalizers))
    )
    return y, lam


def sn_reference(layer, x: Tensor) -> Tensor:
    """SN output in float64 (official semantics: softmax-mixed means and variances)."""
    x = x.double()
    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    mw = torch.softmax(p["mean_weight"], 0)
    vw = torch.softmax(p["var_weight"], 0)
    mean = 0
    var = 0
    for k, name in enumerate(layer.normalizers):
        if name == "bn" and not layer.training:
            m, v = p["running_mean"].view(1, -1, 1, 1), p["running_var"].view(1, -1, 1, 1)
        else:
            m, v = stats64(x, name, layer.num_groups)
        mean = mean + mw[k] * m
        var = var + vw[k] * v
    xhat = (x - mean) / torch.sqrt(var + layer.eps)
    return xhat * p["weight"].view(1, -1, 1, 1) + p["bias"].view(1, -1, 1, 1)
