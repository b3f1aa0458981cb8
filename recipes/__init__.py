"""The packaged recipes (``enorm recipes`` lists them; ``config/registry.py`` reads them).

This folder is installed as the package ``enorm_cli.recipes`` (pyproject's package-dir).
"""
