"""``enorm``: the root Typer app. Each subcommand lives in its own module."""

from __future__ import annotations

import typer

from ..version import __version__
from .build_kernel import build_kernel
from .common import set_debug
from .convert import convert
from .evaluate import evaluate
from .export import export
from .fetch import fetch
from .finetune import finetune
from .inspect import inspect
from .recipes import app as recipes_app

app = typer.Typer(
    name="enorm",
    help=(
        "Exemplar Normalization (EN) for any timm or torchvision model.\n\n"
        "Examples:\n\n"
        "  enorm convert resnet50 --no-pretrained --out r50_en.safetensors\n\n"
        "  enorm convert torchvision:mobilenet_v2 --checkpoint mobilenet_v2-b0353104.pth "
        "--out mnv2_en.safetensors\n\n"
        "  enorm recipes\n\n"
        "  enorm fetch && enorm finetune --recipe quickstart optim.lr=0.02\n\n"
        "  enorm eval runs/quickstart/best.safetensors --data fashion_mnist\n\n"
        "  enorm inspect runs/quickstart/best.safetensors --data fashion_mnist --by-class --plot "
        "ratios.png\n\n"
        "  enorm export runs/quickstart/best.safetensors --out mnv2_en.onnx"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command(no_args_is_help=True)(convert)
app.command(no_args_is_help=True)(finetune)
app.command("eval", no_args_is_help=True)(evaluate)
app.command(no_args_is_help=True)(inspect)
app.command(no_args_is_help=True)(export)
app.command()(fetch)
app.add_typer(recipes_app)
app.command("build-kernel")(build_kernel)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"enorm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool | None = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Exemplar Normalization for timm and torchvision models."""
    set_debug(debug)


def main() -> None:
    """Console-script entry point."""
    app()
