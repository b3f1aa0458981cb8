"""``python -m enorm_cli.build_native``: build EN's optional C++ inference kernel once
(``layers/native.py``); without a compiler it says so in one line and EN keeps its tensor ops."""

from __future__ import annotations

from .layers.native import main

if __name__ == "__main__":
    raise SystemExit(main())
