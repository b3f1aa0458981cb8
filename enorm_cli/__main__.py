"""``python -m enorm_cli``: the same CLI, for ``torchrun -m enorm_cli ...``."""

from .cli.main import main

main()
