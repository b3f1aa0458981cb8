"""EN's cost next to BatchNorm and SN, measured side by side in one interleaved run.

For each model: the timm original (BN, or GN for the GroupNorm model), the same model
converted to SN and to EN by enorm's surgery, and the official SN code's forward
(``official_sn.py``, the baseline the performance issue quotes). Measured per variant: train step
(forward, backward, SGD step), inference, train memory, parameters and FLOPs, every
figure also as a ratio to the original. Repetitions are interleaved, in an order that
changes per repetition so that each variant runs right after each other equally often, and
machine noise hits all alike; medians are reported.

Memory. GPU: ``torch.cuda.max_memory_allocated`` over a train step. CPU: the bytes of the
distinct storages autograd saves for backward in one forward (via
``torch.autograd.graph.saved_tensors_hooks``): the activation memory a train step holds at
its peak, beyond the weights (parameters are counted separately).

    python benchmarks/bench_norm.py                      # quick mode (CPU sizes), < 5 minutes here
    python benchmarks/bench_norm.py --mode full          # batch 32/64 at 224 px (for a GPU)
    python benchmarks/bench_norm.py --layers             # ExemplarNorm2d alone vs nn.BatchNorm2d
    python benchmarks/bench_norm.py --json bench.json
    python benchmarks/bench_norm.py --compile            # torch.compile every variant
    python benchmarks/bench_norm.py --channels-last      # inputs and weights in channels_last
    torchrun --nproc_per_node 2 benchmarks/bench_norm.py --synced   # 2 gloo processes

Synced (``--synced``, under ``torchrun``): the DDP train step as ``enorm finetune`` runs it on
several processes, with each model's bn statistics per process and synced over all of them
(BatchNorm as SyncBatchNorm, on CPU ``enorm_cli.layers.cpu_sync_batchnorm``; EN with
``sync_stats``), interleaved in one run. What it judges: EN's cost relative to BatchNorm,
synced against per-process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.official_sn import OfficialSwitchNorm2d, swap_in_official_sn
from enorm_cli.convert.surgery import ENSettings, replace_norms
from enorm_cli.layers import ExemplarNorm2d, SwitchableNorm2d

# model -> (batch, image size) per mode
MODES: dict[str, dict[str, tuple[int, int]]] = {
    "quick": {"resnet50": (8, 160), "mobilenetv2_100": (64, 32), "resnet50_gn": (8, 160)},
    "full": {"resnet50": (32, 224), "mobilenetv2_100": (64, 224), "resnet50_gn": (32, 224)},
    "smoke": {"test_resnet": (4, 32)},  # what the tests run
}

# Feature shapes (N, C, H, W): resnet50's stage outputs at 160 px, batch 8;
# MobileNetV2's at 32 px, batch 64.
LAYER_SHAPES = [
    (8, 64, 80, 80),
    (8, 256, 40, 40),
    (8, 512, 20, 20),
    (8, 1024, 10, 10),
    (8, 2048, 5, 5),
    (64, 32, 16, 16),
    (64, 144, 8, 8),
    (64, 192, 4, 4),
    (64, 576, 2, 2),
    (64, 960, 1, 1),
]


class Timer:
    """Wall time on CPU; CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def variants(name: str) -> dict[str, nn.Module]:
    import timm

    original = timm.create_model(name, num_classes=1000)
    out = {"bn": original}
    for layer in ("sn", "en"):
        model = copy.deepcopy(original)
        replace_norms(model, ENSettings(layer=layer))
        out[layer] = model
    out["sn_official"] = swap_in_official_sn(copy.deepcopy(original))
    return {k: out[k] for k in ("bn", "sn", "sn_official", "en")}


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def balanced_order(keys: Iterable[str], rep: int) -> list[str]:
    """The variants in repetition rep's order, from a Williams design: over a cycle of n reps
    (2n for odd n) every variant runs first equally often and right after every other one
    equally often. A fixed order would let one variant always run after the same (memory-heavy)
    other one, and carry that in its median.
    """
    order = list(keys)
    n = len(order)
    if n < 2:
        return order
    steps = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    row = [order[(rep + s) % n] for s in steps]
    return row[::-1] if n % 2 and (rep // n) % 2 else row


def bench_models(
    mode: str,
    reps: int,
    device: torch.device,
    only: list[str] | None,
    compile_models: bool = False,
    channels_last: bool = False,
    keep: list[str] | None = None,
) -> list[dict[str, Any]]:
    timer = Timer(device)
    results = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, (batch, size) in MODES[mode].items():
        if only and name not in only:
            continue
        models = {
            k: m.to(device, memory_format=fmt)
            for k, m in variants(name).items()
            if keep is None or k in keep or k == "bn"  # bn: the ratios' base
        }
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (batch,), device=device)
        optims = {
            k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()
        }
        criterion = nn.CrossEntropyLoss()
        run = {k: torch.compile(m) if compile_models else m for k, m in models.items()}

        def train_step(k: str) -> None:
            models[k].train()
            optims[k].zero_grad(set_to_none=True)
            criterion(run[k](x), y).backward()
            optims[k].step()

        def infer(k: str) -> None:
            models[k].eval()
            with torch.no_grad():  # not inference_mode: torch.compile needs the same mode each call
                run[k](x)

        compile_s: dict[str, float] = {}
        for k in models:  # warm-up: allocator, kernels, optimizer state, compilation
            t = time.perf_counter()
            train_step(k)
            infer(k)
            compile_s[k] = time.perf_counter() - t
        train: dict[str, list[float]] = {k: [] for k in models}
        inference: dict[str, list[float]] = {k: [] for k in models}
        for rep in range(reps):
            for k in balanced_order(models, rep):
                train[k].append(timer(lambda k=k: train_step(k)))
            for k in balanced_order(models, rep):
                inference[k].append(timer(lambda k=k: infer(k)))
        row: dict[str, Any] = {"model": name, "batch": batch, "size": size, "variants": {}}
        for k, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                train_step(k)
                memory = torch.cuda.max_memory_allocated()
            else:
                model.train()
                memory = saved_bytes(model, x)
            model.eval()
            row["variants"][k] = {
                "train_s": statistics.median(train[k]),
                "infer_s": statistics.median(inference[k]),
                "memory_bytes": memory,
                "params": sum(p.numel() for p in model.parameters()),
                "flops": flops(model, x),
                "first_calls_s": round(compile_s[k], 2),
            }
        base = row["variants"]["bn"]
        for v in row["variants"].values():
            v["ratio"] = {
                key: v[key] / base[key]
                for key in ("train_s", "infer_s", "memory_bytes", "params", "flops")
            }
        results.append(row)
        print(
            json.dumps({"model": name, **{k: v["ratio"] for k, v in row["variants"].items()}}),
            flush=True,
        )
        for held in (models, run, optims):  # free this model's variants before the next
            held.clear()
    return results


def synced_variants(name: str, device: torch.device) -> dict[str, nn.Module]:
    """BatchNorm and EN, each with bn statistics per process and synced over processes."""
    from enorm_cli.finetune.model import sync_batchnorm
    from enorm_cli.layers.modes import set_sync_stats

    base = variants(name)
    out = {"bn": base["bn"], "en": base["en"]}
    out["bn_synced"] = sync_batchnorm(copy.deepcopy(base["bn"]), device.type)
    out["en_synced"] = copy.deepcopy(base["en"])
    set_sync_stats(out["en_synced"], True)
    return out


def bench_synced(
    mode: str, reps: int, device: torch.device, only: list[str] | None
) -> list[dict[str, Any]]:
    """DDP train steps of BN and EN, per-process and synced statistics, interleaved.

    Every process runs the same steps; rank 0's medians are reported (the collectives keep
    the processes in step). ``excess``: EN's synced ratio to synced BatchNorm minus its
    per-process ratio to BatchNorm, the figure the one-runtime-path target bounds (+0.05).
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    timer = Timer(device)
    results = []
    for name, (batch, size) in MODES[mode].items():
        if only and name not in only:
            continue
        models = {k: m.to(device) for k, m in synced_variants(name, device).items()}
        ddp = {
            k: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
            for k, m in models.items()
        }
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        optims = {
            k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()
        }
        criterion = nn.CrossEntropyLoss()

        def train_step(k: str) -> None:
            ddp[k].train()
            optims[k].zero_grad(set_to_none=True)
            criterion(ddp[k](x), y).backward()
            optims[k].step()

        for k in models:  # warm-up
            train_step(k)
        times: dict[str, list[float]] = {k: [] for k in models}
        for rep in range(reps):
            for k in balanced_order(models, rep):
                dist.barrier()
                times[k].append(timer(lambda k=k: train_step(k)))
        med = {k: statistics.median(v) for k, v in times.items()}
        local, synced = med["en"] / med["bn"], med["en_synced"] / med["bn_synced"]
        row = {
            "model": name,
            "batch": batch,
            "size": size,
            "processes": dist.get_world_size(),
            "train_s": med,
            "en_ratio_per_process": local,
            "en_ratio_synced": synced,
            "excess": synced - local,
        }
        results.append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
        for held in (models, ddp, optims):
            held.clear()
    return results


def bench_layers(reps: int, device: torch.device) -> list[dict[str, Any]]:
    """Forward + backward of one norm layer on each feature shape, interleaved."""
    timer = Timer(device)
    rows = []
    for shape in LAYER_SHAPES:
        c = shape[1]
        layers = {
            "bn": nn.BatchNorm2d(c),
            "sn": SwitchableNorm2d(c),
            "sn_official": OfficialSwitchNorm2d(c),
            "en": ExemplarNorm2d(c),
        }
        layers = {k: m.to(device).train() for k, m in layers.items()}
        x = torch.randn(*shape, device=device, requires_grad=True)
        grad = torch.randn(*shape, device=device)

        def step(k: str) -> None:
            layers[k](x).backward(grad)

        for k in layers:
            step(k)
        times: dict[str, list[float]] = {k: [] for k in layers}
        for rep in range(reps):
            for k in balanced_order(layers, rep):
                times[k].append(timer(lambda k=k: step(k)))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "shape": list(shape),
                **{f"{k}_ms": med[k] * 1e3 for k in med},
                **{f"{k}_ratio": med[k] / med["bn"] for k in med if k != "bn"},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_tables(models: list[dict[str, Any]], layers: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    if models:
        table = Table(
            title="train step, inference, memory, params, FLOPs: value and ratio to the original"
        )
        for col in (
            "model",
            "variant",
            "train step",
            "inference",
            "train memory",
            "params",
            "GFLOPs",
            "first calls",
        ):
            table.add_column(col, justify="right" if col not in ("model", "variant") else "left")
        for row in models:
            for k, v in row["variants"].items():
                r = v["ratio"]
                table.add_row(
                    f"{row['model']} b{row['batch']} {row['size']}px",
                    k,
                    f"{v['train_s'] * 1e3:.0f} ms ({r['train_s']:.2f}x)",
                    f"{v['infer_s'] * 1e3:.0f} ms ({r['infer_s']:.2f}x)",
                    f"{v['memory_bytes'] / 2**20:.0f} MiB ({r['memory_bytes']:.2f}x)",
                    f"{v['params'] / 1e6:.2f}M ({r['params']:.3f}x)",
                    f"{v['flops'] / 1e9:.2f} ({r['flops']:.3f}x)",
                    f"{v['first_calls_s']:.1f} s",
                )
        console.print(table)
    if layers:
        table = Table(title="one layer, forward + backward (train mode)")
        for col in (
            "N x C x H x W",
            "BN ms",
            "SN ms (x BN)",
            "official SN ms (x BN)",
            "EN ms (x BN)",
        ):
            table.add_column(col, justify="right")
        for row in layers:
            table.add_row(
                "x".join(map(str, row["shape"])),
                f"{row['bn_ms']:.2f}",
                *(
                    f"{row[k + '_ms']:.2f} ({row[k + '_ratio']:.2f}x)"
                    for k in ("sn", "sn_official", "en")
                ),
            )
        console.print(table)


def machine_meta(device: torch.device) -> dict[str, Any]:
    """Date, device, torch version and threads: what every JSON of this script records."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--models", nargs="*", default=None, help="a subset of the mode's models")
    parser.add_argument(
        "--variants", nargs="*", default=None, help="a subset of bn, sn, sn_official, en"
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--layers", action="store_true", help="the layer microbenchmark instead of models"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every variant; 'first calls' = compile time",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last inputs and weights"
    )
    parser.add_argument(
        "--synced",
        action="store_true",
        help="under torchrun: DDP train steps, per-process vs synced bn statistics",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.synced:
        return synced_main(args, device, start)
    layers = bench_layers(args.reps, device) if args.layers else []
    # the official SN code's unbiased instance variance is NaN on 1x1 maps (it warns every call)
    warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")
    models = (
        []
        if args.layers
        else bench_models(
            args.mode,
            args.reps,
            device,
            args.models,
            args.compile,
            args.channels_last,
            args.variants,
        )
    )
    print_tables(models, layers)
    meta = {
        **machine_meta(device),
        "mode": args.mode,
        "reps": args.reps,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"finished in {meta['seconds']} s on {meta['device']}")
    if args.json:
        args.json.write_text(
            json.dumps({"meta": meta, "models": models, "layers": layers}, indent=1)
        )
    return 0


def synced_main(args: argparse.Namespace, device: torch.device, start: float) -> int:
    """``--synced``: join torchrun's process group, measure, and (rank 0) write the JSON."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        print("--synced runs under torchrun: torchrun --nproc_per_node 2 bench_norm.py --synced")
        return 2
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    try:
        rows = bench_synced(args.mode, args.reps, device, args.models)
        if dist.get_rank() == 0:
            meta = {
                **machine_meta(device),
                "processes": dist.get_world_size(),
                "mode": args.mode,
                "reps": args.reps,
                "seconds": round(time.perf_counter() - start, 1),
            }
            for row in rows:
                print(
                    f"{row['model']}: EN / BN per process {row['en_ratio_per_process']:.2f}x, "
                    f"synced {row['en_ratio_synced']:.2f}x (excess {row['excess']:+.2f})"
                )
            if args.json:
                args.json.write_text(json.dumps({"meta": meta, "synced": rows}, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
