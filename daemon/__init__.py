"""The wattprint daemon: sources, attribution, ledger, HTTP API and CLI.

``__version__`` comes from the installed package's metadata, whose one source is
``[project] version`` in pyproject.toml (the CLI's ``--version``, the
``wattprint_build_info`` metric and ``/api/v1/host`` all show it).
"""

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("wattprint")
except _metadata.PackageNotFoundError:  # run from a tree that was never installed
    __version__ = "0+unknown"
