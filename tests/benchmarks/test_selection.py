"""The selection benchmark's pieces: the shifted split, the AUC, and a tiny run end to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import selection  # noqa: E402


def test_auc_is_the_rank_statistic() -> None:
    positive = torch.tensor([False, False, True, True])
    assert selection.auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), positive) == 1.0
    assert selection.auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), positive) == 0.0
    assert selection.auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), positive) == 0.5


def test_half_of_the_images_are_shifted_the_same_way_every_time() -> None:
    a = selection.shifted_split(False, 64)
    b = selection.shifted_split(False, 64)
    assert torch.equal(a["x"], b["x"]) and int(a["shifted"].sum()) == 32
    assert (a["a"][~a["shifted"]] == 1).all() and (a["b"][~a["shifted"]] == 0).all()
    assert a["x"].shape == (64, 3, 32, 32)


def test_the_coded_construction_gives_the_clean_group_its_class_contrast() -> None:
    plain = selection.shifted_split(False, 64)
    coded = selection.shifted_split(False, 64, construction="coded")
    clean = ~coded["shifted"]
    expected = 2.0 ** (2 * coded["y"][clean].double() / 9 - 1)
    assert torch.allclose(coded["a"][clean].double(), expected)
    assert (coded["b"][clean] == 0).all()
    # the shifted group is the same images, shifted the same way, in both constructions
    assert torch.equal(plain["x"][~clean], coded["x"][~clean])


def test_strong_shifts_leave_out_the_shifted_images_close_to_clean() -> None:
    data = {
        "a": torch.tensor([1.0, 1.0, 1.6, 1.2, 1.0]),
        "b": torch.tensor([0.0, 0.0, 0.0, 0.1, 0.3]),
        "shifted": torch.tensor([False, True, True, True, True]),
    }
    assert selection.strong_shift(data).tolist() == [False, False, True, False, True]


def test_the_detector_ceiling_trains_the_branch_alone() -> None:
    out = selection.detector_ceiling("shift", train=256, test=128, steps=60)
    starts = ("scratch", "scratch_readout", "finetune")
    assert set(out) == {s + t for s in starts for t in ("", "_strong")}
    # even a few steps on a few images tell the groups apart better than chance
    assert all(0.6 < v <= 1 for v in out.values())
    table = selection.ceiling_table([{"construction": "shift", **out}])
    assert table.count("\n") == 2 and "ImageNet first conv" in table


def test_the_budget_ceiling_trains_the_branch_as_a_run_does() -> None:
    out = selection.detector_ceiling("shift", train=256, test=128, steps=40, budget="scratch")
    # the regime's convolution only, trained with the recipe's groups, schedule and clip
    assert set(out) == {"scratch", "scratch_strong"}
    assert all(0.6 < v <= 1 for v in out.values())
    row = {"construction": "shift", "regime": "scratch", "steps": 40, **out}
    assert selection.budget_table([row]).splitlines()[-1].startswith("| shift | scratch | 40 | ")


def test_explained_share_is_the_between_label_variance() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert selection.explained_share(torch.tensor([0.0, 0.0, 1.0, 1.0]), labels) == 1.0
    assert selection.explained_share(torch.tensor([0.0, 1.0, 0.0, 1.0]), labels) == 0.0
    assert selection.explained_share(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) is None
    share = selection.explained_share(torch.tensor([0.0, 0.2, 1.0, 1.0]), labels)
    assert share is not None and 0.9 < share < 1.0


def test_the_spread_input_is_undone_after_its_run() -> None:
    from enorm_cli.layers import exemplar_function, is_fused_en

    before = (exemplar_function.ratio_logits, is_fused_en(), os.environ.get("ENORM_NATIVE"))
    with selection._spread_input():
        assert exemplar_function.ratio_logits is not before[0] and not is_fused_en()
        assert os.environ["ENORM_NATIVE"] == "0"
    after = (exemplar_function.ratio_logits, is_fused_en(), os.environ.get("ENORM_NATIVE"))
    assert after == before


def _one_layer_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An EN layer with random affines and MobileNetV2's in-place ReLU6 under a linear head,
    after one training batch, and six images (three shifted)."""
    from enorm_cli import ExemplarNorm2d

    torch.manual_seed(0)
    layer = ExemplarNorm2d(4, ("bn", "in", "ln"))
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    model = torch.nn.Sequential(
        layer, torch.nn.ReLU6(inplace=True), torch.nn.Flatten(), torch.nn.Linear(4 * 25, 3)
    )
    model(torch.randn(16, 4, 5, 5) * 3 + 1)  # running statistics, the branch's hidden mean
    data = {"x": torch.randn(6, 4, 5, 5) * 2, "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    return model, data | {"shifted": torch.arange(6) % 2 == 1}


def test_loss_preference_is_the_loss_change_of_moving_weight_from_bn_to_in() -> None:
    model, data = _one_layer_model()
    layer = model[0]
    model.eval()
    (asked,) = selection.loss_preference(model, data)

    def losses() -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(data["x"]), data["y"], reduction="none")

    step, before = 1e-4, losses()
    layer.mix_offset[1] += step  # w = lambda + offset: IN's weight up, BN's down
    layer.mix_offset[0] -= step
    assert asked.abs().max() > 0.05  # the layer matters to the loss
    assert torch.allclose(asked.float(), (before - losses()) / step, rtol=1e-2, atol=1e-3)


def _reference(route: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A random BatchNorm MobileNetV2 with its first norm layer routed (``route``), in double
    precision, so that differences can read a random network's small effects, with running
    statistics of its eight coded images."""
    recipe = selection.recipe_for("scratch", "bn", 8, 0.05, 1)
    torch.manual_seed(0)
    model = selection.build(recipe, "scratch")
    routed = selection._route_first_norm(model, route)
    data = selection.shifted_split(False, 8, construction="coded")
    model, data["x"] = model.double(), data["x"].double()
    routed.mask = data["shifted"]
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(data["x"])
    return model, routed, data


def test_routed_preference_is_the_loss_change_of_moving_the_first_layer_to_in() -> None:
    model, routed, data = _reference("group")
    asked = selection.routed_preference(model, routed, data)
    step = 1e-4

    def losses(move: float) -> torch.Tensor:
        def hook(mod: Any, args: Any, out: Any) -> Any:  # Y + step (Y_in - Y_bn)
            x, bn = args[0], mod.bn
            y_in = torch.nn.functional.instance_norm(x, eps=bn.eps)
            y_in = y_in * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
            return out + move * (y_in - bn(x))

        handle = routed.register_forward_hook(hook)
        routed.mask = data["shifted"]
        with torch.no_grad():
            out = model(data["x"])
        handle.remove()
        return torch.nn.functional.cross_entropy(out, data["y"], reduction="none")

    assert asked.abs().max() > 0  # the layer matters to the loss
    expected = (losses(0.0) - losses(step)) / step
    assert torch.allclose(asked, expected, rtol=1e-2, atol=1e-2 * float(asked.abs().max()))


def test_the_preference_table_reads_runs_that_carry_it() -> None:
    run = {"regime": "scratch", "variant": "en", "seed": 0, "top1_clean": 80.0}
    run |= {"top1_shifted": 70.0, "best_auc_in_ln": 0.8, "layers": []}
    with_it = {**run, "best_loss_pref_auc": 0.55, "largest_loss_pref_t": -3.0}
    table = selection.preference_table(
        [run | {"variant": "sn"}, with_it | {"first_loss_pref_t": 2}]
    )
    assert table.count("\n") == 2  # the header, and the EN run alone
    assert "| scratch | en | 80.00 (80.00-80.00) |" in table and "| -3.0 (-3.0--3.0) |" in table
    assert len({line.count("|") for line in table.splitlines()}) == 1  # a cell per column


def test_the_first_layer_table_reads_en_and_the_references() -> None:
    run = {"regime": "scratch", "seed": 0, "top1_clean": 80.0, "top1_shifted": 70.0}
    en = run | {"variant": "en", "first_loss_pref_auc": 0.52, "first_loss_pref_t": 0.4}
    routed = run | {"variant": "bn_routed_first", "first_loss_pref_auc": 0.5}
    routed |= {"first_loss_pref_t": -1.0, "first_switch_pref_auc": 0.8, "first_switch_pref_t": 17}
    table = selection.first_preference_table([en, routed, run | {"variant": "bn"}])
    lines = table.splitlines()
    assert len(lines) == 4 and len({line.count("|") for line in lines}) == 1
    assert lines[2].endswith("| 0.800 (0.800-0.800) | 17.0 (17.0-17.0) |")
    assert lines[3].startswith("| scratch | en |") and lines[3].endswith("| - | - |")


def test_the_probe_reads_a_copy_and_leaves_the_model_as_it_was() -> None:
    model, data = _one_layer_model()
    with torch.no_grad():  # images' ratios apart, as after some training
        model[0].ratio.fc2.weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = selection.preference_probe(model, data)
    assert model.training  # not switched to evaluation mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    (asked,) = selection.loss_preference(model, data)
    assert probe["largest_layer"] == 0 and len(probe["t"]) == 1
    assert probe["largest_t"] == pytest.approx(selection.group_t(asked, data["shifted"]))
    # the ratios' gap between the groups, in evaluation mode
    with torch.no_grad():
        lam = model[0].ratios(data["x"])
    per_image = lam[:, 1] + lam[:, 2]
    gap = float(per_image[data["shifted"]].mean() - per_image[~data["shifted"]].mean())
    assert abs(gap) > 1e-6 and probe["gaps"] == [pytest.approx(gap, rel=1e-2)]
    assert probe["largest_gap"] == pytest.approx(gap, rel=1e-2)
    assert probe["largest_gap_layer"] == 0


def test_the_trace_table_has_a_row_per_probe() -> None:
    layers = [{"name": "a"}, {"name": "b"}]
    trace = [{"step": 25, "t": [1.0, -4.0], "largest_t": -4.0, "largest_layer": 1}]
    run = {"regime": "scratch", "variant": "en", "seed": 0, "layers": layers}
    table = selection.trace_table([run | {"preference_trace": trace}, run])
    assert table.splitlines()[2] == "| scratch | en | 0 | 25 | 1.0 | -4.0 | `b` | 1 of 2 |"
    assert table.count("\n") == 2


def test_group_t_is_the_gap_in_standard_errors() -> None:
    values = torch.tensor([1.0, 3.0, 5.0, 7.0])
    positive = torch.tensor([False, False, True, True])
    # means 2 and 6, variances 2 and 2: se = sqrt(2/2 + 2/2)
    assert selection.group_t(values, positive) == pytest.approx(4 / 2**0.5)


@pytest.mark.slow
def test_a_tiny_run_writes_its_record_and_figure(tmp_path: Path) -> None:
    out, figure = tmp_path / "s.json", tmp_path / "s.png"
    args = ["--variants", "bn", "en", "--regimes", "finetune", "scratch", "--train", "128"]
    args += ["--test", "64", "--epochs", "1", "1", "--json", str(out), "--figure", str(figure)]
    assert selection.main([*args, "--save", str(tmp_path / "models")]) == 0
    record = json.loads(out.read_text())
    assert {(r["regime"], r["variant"]) for r in record["runs"]} == {
        (g, v) for g in ("finetune", "scratch") for v in ("bn", "en")
    }
    en = next(r for r in record["runs"] if r["variant"] == "en")
    assert len(en["layers"]) == 52 and 0 <= en["best_auc_in"] <= 1
    assert {"logit_std", "saturated", "gamma_rel", "gap_in_ln"} <= set(en["layers"][0])
    assert {"auc_in_ln_strong", "class_share_in_ln", "group_share_in_ln"} <= set(en["layers"][0])
    assert {"loss_pref_auc", "loss_pref_gap", "loss_pref_t"} <= set(en["layers"][0])
    assert all(lay["hidden_move"] > 0 for lay in en["layers"])  # the branch's hidden layer learns
    assert en["preference_trace"] == []  # read only with --probe-every
    assert figure.stat().st_size > 0
    from enorm_cli import ExemplarNorm2d, load_model

    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert saved == ["finetune-en-s0.safetensors", "scratch-en-s0.safetensors"]  # not BN
    layers = [
        m
        for m in load_model(tmp_path / "models" / saved[1]).modules()
        if isinstance(m, ExemplarNorm2d)
    ]
    assert len(layers) == 52 and all(m.anchored for m in layers)  # from scratch: anchored


def test_merge_joins_the_runs_of_earlier_records(tmp_path: Path) -> None:
    record = json.loads((ROOT / "benchmarks/results/selection_routing.json").read_text())
    runs = record["figures"]["runs"][:3]
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    parts[0].write_text(json.dumps({"runs": runs[:1]}))
    parts[1].write_text(json.dumps({"runs": runs[1:]}))
    out = tmp_path / "merged.json"
    assert selection.main(["--merge", *map(str, parts), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["runs"] == runs
    assert merged["settings"]["merge"] == [str(p) for p in parts]


@pytest.mark.slow
def test_a_released_anchor_ends_at_the_ratios(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    args = ["--variants", "en_release", "--regimes", "scratch", "--train", "128", "--test", "64"]
    assert selection.main([*args, "--epochs", "1", "1", "--save", str(tmp_path)]) == 0
    state = load_file(tmp_path / "scratch-en_release-s0.safetensors")
    offsets = [v for k, v in state.items() if k.endswith("mix_offset")]
    # anchored at conversion (the offset makes the mixing one-hot), released after one epoch
    assert len(offsets) == 52 and all((o == 0).all() for o in offsets)


def test_logit_noise_reaches_training_forwards_only() -> None:
    from enorm_cli import ExemplarNorm2d

    layer, x = ExemplarNorm2d(8, ("bn", "in", "ln")), torch.randn(4, 8, 5, 5)
    shipped = layer.ratios(x)
    with selection._noisy_logits():
        assert torch.equal(layer.ratios(x), shipped)  # no training forward: no noise
        selection.NOISE["sigma"] = 1.0
        try:
            noisy = layer.ratios(x)
        finally:
            selection.NOISE["sigma"] = 0.0
    assert (noisy - shipped).abs().max() > 0.01
    assert torch.allclose(noisy.sum(1), torch.ones(4))
    assert torch.equal(layer.ratios(x), shipped)  # undone after the block


@pytest.mark.slow
def test_the_reference_path_is_entered_in_a_fresh_process() -> None:
    import subprocess

    code = (
        "import os, selection\n"
        "with selection._reference_path():\n"
        "    from enorm_cli import layers\n"
        "    assert os.environ['ENORM_NATIVE'] == '0' and not layers.is_fused_en()\n"
        "assert layers.is_fused_en() and 'ENORM_NATIVE' not in os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ENORM_NATIVE"}
    env["PYTHONPATH"] = str(ROOT / "benchmarks")
    # the first thing a fresh process does, before anything else has imported enorm_cli.layers
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_a_whole_switch_compares_the_first_layer_as_bn_and_as_in() -> None:
    model, routed, data = _reference("in")
    switched = selection.routed_full_preference(model, routed, data)
    assert routed.route == "in"  # the reference is left as it was
    with torch.no_grad():
        as_in = torch.nn.functional.cross_entropy(model(data["x"]), data["y"], reduction="none")
        routed.route, routed.mask = "group", torch.zeros(8, dtype=torch.bool)
        as_bn = torch.nn.functional.cross_entropy(model(data["x"]), data["y"], reduction="none")
    assert torch.allclose(switched, as_bn - as_in)
    assert switched.abs().max() > 0


def test_an_en_switch_compares_the_first_layer_as_its_bn_and_as_its_in() -> None:
    model, data = _one_layer_model()
    layer = model[0]
    model.eval()
    switched = selection.en_switch_preference(model, data)
    x = data["x"]
    rm, rv = layer.running_mean.view(1, -1, 1, 1), layer.running_var.view(1, -1, 1, 1)
    im, iv = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    w, b = (t.view(3, 1, -1, 1, 1) for t in (layer.weight, layer.bias))
    with torch.no_grad():
        head = model[1:]
        as_bn = head(w[0] * (x - rm) / (rv + layer.eps).sqrt() + b[0])
        as_in = head(w[1] * (x - im) / (iv + layer.eps).sqrt() + b[1])
        losses = [
            torch.nn.functional.cross_entropy(o, data["y"], reduction="none")
            for o in (as_bn, as_in)
        ]
    assert torch.allclose(switched.float(), losses[0] - losses[1], atol=1e-5)
    assert switched.abs().max() > 0.01


def _put_back(model: torch.nn.Module, buffers: list[torch.Tensor]) -> None:
    """The model's buffers (running statistics, the branch's hidden mean) as they were."""
    for b, saved in zip(model.buffers(), buffers, strict=True):
        b.copy_(saved)


def _hard_losses(model: torch.nn.Module, data: dict[str, Any], choice: torch.Tensor) -> Any:
    """Per sample, the loss of ``_one_layer_model`` in training mode with its EN layer replaced
    by one normalizer per sample (0: BN on the batch, 1: IN, 2: LN), each with its affine."""
    layer, x = model[0], data["x"]
    dims = {0: (0, 2, 3), 1: (2, 3), 2: (1, 2, 3)}
    outs = []
    for k, d in dims.items():
        mean, var = x.mean(d, keepdim=True), x.var(d, unbiased=False, keepdim=True)
        w, b = layer.weight[k].view(1, -1, 1, 1), layer.bias[k].view(1, -1, 1, 1)
        outs.append(w * (x - mean) / (var + layer.eps).sqrt() + b)
    y = torch.stack(outs)[choice, torch.arange(len(choice))]
    return torch.nn.functional.cross_entropy(model[1:](y), data["y"], reduction="none")


def test_an_explored_step_switches_one_normalizer_in_and_rewards_it() -> None:
    model, data = _one_layer_model()
    layer, (x, y) = model[0], (data["x"], data["y"])
    model.train()
    # the generator draws each sample's layer (one here: all 0), then its normalizer
    g = torch.Generator().manual_seed(0)
    torch.randint(1, (6,), generator=g)
    choice = torch.randint(3, (6,), generator=g)
    assert len(set(choice.tolist())) > 1
    start = [b.clone() for b in model.buffers()]

    def step(
        weight: float, baseline: torch.Tensor, centered: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        _put_back(model, start)
        g = torch.Generator().manual_seed(0)
        with selection._explored_mixing():
            loss = selection.explore_step(model, x, y, baseline, weight, g, centered)
        (grad,) = torch.autograd.grad(loss, layer.ratio.fc2.bias)
        return loss, grad, [b.clone() for b in model.buffers()]

    unseen = torch.full((1, 3), float("nan"), dtype=torch.float64)
    loss, plain, _ = step(0.0, unseen.clone())
    _, scored, after = step(2.0, unseen.clone())
    running = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    _, centered, _ = step(2.0, running, centered=True)
    assert selection.EXPLORE["mask"] is None  # reset after the block
    _put_back(model, start)
    hard = _hard_losses(model, data, choice)
    assert torch.allclose(loss, hard.mean(), atol=1e-5)
    # the running statistics move once, as after the explored forward alone
    with selection._explored_mixing():
        selection.EXPLORE.update(mask=torch.ones(6, 1, dtype=torch.bool), choice=choice.view(6, 1))
        model(x)
    assert all(torch.equal(a, b) for a, b in zip(after, model.buffers(), strict=True))
    # the score: weight x the advantage (explored loss - the mixture's) x grad log lambda_k
    _put_back(model, start)
    with torch.no_grad():
        advantage = hard - torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    lam = layer.ratios(x)
    score = (advantage * lam[torch.arange(6), choice].log()).sum() * 2.0 / 6
    (expected,) = torch.autograd.grad(score, layer.ratio.fc2.bias, retain_graph=True)
    assert advantage.abs().max() > 0.01 and expected.abs().max() > 1e-4
    assert torch.allclose(scored - plain, expected, atol=1e-5)
    # centered: each switch's advantage less its running mean, which then takes the batch's in
    start_mean = torch.tensor([0.3, -0.2, 0.1])
    gain = advantage - start_mean[choice]
    score = (gain * lam[torch.arange(6), choice].log()).sum() * 2.0 / 6
    (expected,) = torch.autograd.grad(score, layer.ratio.fc2.bias)
    assert torch.allclose(centered - plain, expected, atol=1e-5)
    means = torch.stack([advantage[choice == k].mean() for k in range(3)]).double()
    assert torch.allclose(running[0], 0.9 * start_mean.double() + 0.1 * means, atol=1e-6)


@pytest.mark.parametrize("variant", ["en_explore", "en_explore0", "en_pair", "en_pair_switch"])
def test_every_explored_variant_runs_inside_the_switches(variant: str) -> None:
    from enorm_cli.layers import exemplar_function as ef

    shipped = ef.mixing_weights
    with selection.variant_context(variant):
        assert ef.mixing_weights is not shipped
    assert ef.mixing_weights is shipped


def test_the_switches_find_their_layer_on_a_fresh_model() -> None:
    from enorm_cli import ExemplarNorm2d

    torch.manual_seed(0)
    layers = [ExemplarNorm2d(4), ExemplarNorm2d(4)]
    model = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(4 * 25, 3))
    x, y = torch.randn(6, 4, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.tensor([[False, True]] * 6)  # every image switches the second layer only
    # a fresh centered branch first reads its hidden mean without gradients: not a switch
    bn = torch.zeros(6, 2, dtype=torch.long)  # to its BN alone
    with selection._explored_mixing(), selection._switched(model, mask, bn) as taken:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        assert [j for j, *_ in taken] == [1]
    first, second = torch.autograd.grad(loss, [m.ratio.fc2.bias for m in layers], allow_unused=True)
    assert first.abs().max() > 1e-6  # the mixture, read by the loss
    assert second is None or torch.equal(second, torch.zeros(3))  # switched: not used


def test_the_routing_table_counts_runs_with_a_group_gap() -> None:
    def run(variant: str, seed: int, gap: float, auc: float) -> dict[str, Any]:
        layers = [{"gap_in_ln": 0.01}, {"gap_in_ln": gap}]
        return {"regime": "scratch", "variant": variant, "seed": seed, "layers": layers} | {
            "best_auc_in_ln": auc
        }

    runs = [run("en", 0, 0.3, 0.9), run("en", 1, 0.1, 0.7), run("en", 2, -0.4, 0.6)]
    runs += [run("en", 3, 0.25, 0.8)] + [run("en_warm_quarter", s, 0.5, 0.9) for s in range(3)]
    en, warm = selection.routing_table(runs).splitlines()[-2:]
    # a negative gap (less IN + LN for the shifted images) is not routing by group; Wilson's
    # interval for 2 of 4 is 0.15-0.85, and Fisher's p for 3 of 3 against 2 of 4 is 9/21
    assert en == "| scratch | en | 2 of 4 | 0.15-0.85 | - | 0.850 | 0.650 |"
    assert warm == "| scratch | en_warm_quarter | 3 of 3 | 0.44-1.00 | 0.43 | 0.900 | - |"


def test_the_branch_table_counts_layers_whose_ratios_spread() -> None:
    def layer(bn_sd: float, saturated: float, in_mean: float, move: float) -> dict[str, Any]:
        return {
            "normalizers": ["bn", "in", "ln"],
            "std": [bn_sd, 0.5, 0.5],  # in + ln's sd is bn's: the others do not count
            "mean": [0.8, in_mean, 0.2 - in_mean],
            "saturated": saturated,
            "hidden_move": move,
        }

    def run(seed: int, layers: list[dict[str, Any]]) -> dict[str, Any]:
        top1 = {"top1_clean": 80.0 + seed, "top1_shifted": 70.0}
        return {"regime": "scratch", "variant": "en", "seed": seed, "layers": layers} | top1

    runs = [
        run(
            0, [layer(0.2, 0.1, 0.5, 0.1), layer(0.005, 0.3, 0.1, 0.3), layer(0.02, 0.2, 0.1, 0.2)]
        ),
        run(
            1,
            [layer(0.001, 0.9, 0.1, 0.01), layer(0.5, 0.9, 0.1, 0.03), layer(0.0, 0.9, 0.1, 0.02)],
        ),
        run(0, []) | {"variant": "bn"},
    ]
    lines = selection.branch_table(runs).splitlines()
    assert len(lines) == 3  # BatchNorm has no branch: no row
    assert lines[2] == (
        "| scratch | en | 80.50 (80.00-81.00) | 70.00 (70.00-70.00) | 1.5 (1.0-2.0) "
        "| 0.55 (0.20-0.90) | 0.30 (0.10-0.50) | 0.1100 (0.0200-0.2000) |"
    )  # the hidden layer's move: the median layer's, 0.2 and 0.02


def test_the_share_interval_and_the_exact_test_match_their_textbook_values() -> None:
    # Wilson: 0 of 10 gives 0-0.278; Fisher: 1 of 10 against 9 of 10, p = 0.0011
    assert selection.share_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert selection.fisher_p(1, 10, 9, 10) == pytest.approx(0.001093, abs=1e-6)
    assert selection.fisher_p(5, 10, 5, 10) == pytest.approx(1.0)


def _paired_steps(
    model: Any, data: dict[str, Any], switched: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """A paired step's loss and FC2-weight gradient without a reward and at weight 0.5, from
    the same start (returned, with the last step's running baseline)."""
    layer, (x, y) = model[0], (data["x"], data["y"])
    with torch.no_grad():  # images' ratios apart, as after some training
        layer.ratio.fc2.weight.normal_()
    model.train()
    start = [b.clone() for b in model.buffers()]
    grads, losses = [], []
    for weight in (0.0, 0.5):
        _put_back(model, start)
        baseline = torch.full((1, 3), float("nan"), dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        with selection._explored_mixing():
            loss = selection.paired_step(model, x, y, baseline, weight, g, switched)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, layer.ratio.fc2.weight)[0])
    return losses, grads, start, baseline


def _assert_the_pair_scores(
    model: Any, data: dict[str, Any], start: list[torch.Tensor], grads: list[torch.Tensor]
) -> torch.Tensor:
    """The reward's gradient is that of sum_k lambda_k (L_k - mean_k L_k) x 0.5 / N, L_k each
    image's loss with its layer on normalizer k alone; returns the L_k (N x K)."""
    _put_back(model, start)
    # each image alone under each normalizer, the mixture elsewhere (one layer here: all of it)
    switch = torch.stack([_hard_losses(model, data, torch.full((6,), k)) for k in range(3)], 1)
    rel = (switch - switch.mean(0)).detach()
    lam = model[0].ratios(data["x"])
    (expected,) = torch.autograd.grad((lam * rel).sum() * 0.5 / 6, model[0].ratio.fc2.weight)
    assert expected.abs().max() > 1e-5
    assert torch.allclose(grads[1] - grads[0], expected, rtol=1e-3, atol=1e-8)
    return switch


def test_a_paired_step_reads_every_normalizer_and_trains_on_the_mixture() -> None:
    model, data = _one_layer_model()
    losses, grads, start, baseline = _paired_steps(model, data, switched=False)
    _put_back(model, start)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(data["x"]), data["y"])
        assert torch.allclose(losses[0], expected)
    switch = _assert_the_pair_scores(model, data, start, grads)
    assert torch.allclose(baseline[0].float(), switch.mean(0), atol=1e-5)  # the first mean


def test_a_switched_paired_step_trains_on_the_switches_and_scores_the_pair() -> None:
    model, data = _one_layer_model()
    # the generator draws each image's layer (one here: all 0), then its normalizer
    g = torch.Generator().manual_seed(0)
    torch.randint(1, (6,), generator=g)
    choice = torch.randint(3, (6,), generator=g)
    assert len(set(choice.tolist())) > 1
    losses, grads, start, _ = _paired_steps(model, data, switched=True)
    _put_back(model, start)
    hard = _hard_losses(model, data, choice)
    assert torch.allclose(losses[0], hard.mean(), atol=1e-5)  # the switches, not the mixture
    _assert_the_pair_scores(model, data, start, grads)


def test_the_gap_trace_has_a_row_per_probe_and_the_end() -> None:
    layers = [{"name": "a", "gap_in_ln": 0.02}, {"name": "b", "gap_in_ln": 0.4}]
    trace = [{"step": 25, "gaps": [0.01, 0.0], "largest_gap": 0.01, "largest_gap_layer": 0}]
    run = {"regime": "scratch", "variant": "en", "seed": 3, "layers": layers}
    lines = selection.gap_trace_table([run | {"preference_trace": trace}]).splitlines()
    assert lines[2:] == [
        "| scratch | en | 3 | 25 | 0.010 | `a` | 0.010 |",
        "| scratch | en | 3 | end, all test images | 0.400 | `b` | 0.020 |",
    ]
    assert len(selection.gap_trace_table([run]).splitlines()) == 2  # no probes: no rows


@pytest.mark.parametrize("variant", sorted(selection.VARIANTS))
def test_every_variant_is_a_valid_minimal_recipe(variant: str) -> None:
    """A variant's recipe keys go through the schema (a misspelt key fails here, not after a
    run's first minutes), with its optimizer where it names one."""
    recipe = selection.recipe_for("scratch", variant, 64, 0.002, 1)
    spec = selection.VARIANTS[variant]
    assert recipe.model.norm == spec["norm"]
    assert recipe.optim.name == spec.get("optim", {}).get("name", "sgd")
    assert recipe.optim.lr == 0.002
