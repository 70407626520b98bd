"""The ``datapipe`` command line: one click group, one module per command group.

Every module listed in ``_COMMAND_MODULES`` defines ``COMMANDS``, a list of click commands or groups.
Commands parse arguments and call library functions; no logic lives here.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

_COMMAND_MODULES = ("ingest", "inspect", "verify", "decompose", "buckets", "tas", "regmix")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="datapipe")
def main() -> None:
    """datapipe: Arrow-backed datasets, resumable loaders and paper-grade batch samplers.

    \b
    Example:
      datapipe ingest "/usr/lib/python3.11/**/*.py" --out corpus
      datapipe inspect corpus --plot lengths.png
    """


for _name in _COMMAND_MODULES:
    if importlib.util.find_spec(f"datapipe.cli.{_name}") is None:
        continue
    for _cmd in importlib.import_module(f"datapipe.cli.{_name}").COMMANDS:
        main.add_command(_cmd)
