"""The ``datapipe`` command line: one click group, one module per command group.

Every module listed in ``_COMMAND_MODULES`` defines ``COMMANDS``, a list of click commands or groups.
Commands parse arguments and call library functions; no logic lives here.

One error path for every command (:class:`_Group`): a user error raised by the library (``DatasetError``,
``ValueError``, ``OSError``, ``KeyError``, Arrow, JSON, pandas and pickle parse errors, ...) is printed as
``Error: <message>`` on stderr with exit code 1 (click usage errors keep exit code 2), without a traceback
unless ``--debug`` is given (or ``DATAPIPE_DEBUG=1`` is set). Library parameter names in the message
(``pass overwrite=True``) are rewritten to the command's flags (``pass --overwrite``). Warnings print as one
``Warning (<category>): <message>`` line.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re

import click

_COMMAND_MODULES = ("ingest", "inspect", "verify", "decompose", "buckets", "tas", "regmix", "audio", "plan")

# errors a user can act on from the message alone; anything else is a bug of ours (named as such)
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, EOFError, ImportError,
                                                 RuntimeError, pickle.UnpicklingError)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return ()
    return (pa.ArrowException,)


def _flags_of(cmd: click.Command | None) -> dict[str, tuple[str, bool]]:
    """Library parameter name -> (the command's flag, whether it is a bare flag) for ``cmd`` and its subcommands."""
    out: dict[str, tuple[str, bool]] = {}
    if cmd is None:
        return out
    for sub in getattr(cmd, "commands", {}).values():
        out.update(_flags_of(sub))
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name:
            longs = [o for o in p.opts if o.startswith("--")] or list(p.opts)
            out[p.name] = (longs[0], bool(p.is_flag))
    return out


def cli_message(message: str, flags: dict[str, tuple[str, bool]]) -> str:
    """Rewrite ``name=value`` of library parameters in ``message`` as the command line's ``--flag value``.

    >>> cli_message("exists (pass overwrite=True to replace it)", {"overwrite": ("--overwrite", True)})
    'exists (pass --overwrite to replace it)'
    """
    if not flags:
        return message

    def sub(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        flag, bare = flags[name]
        if bare and value in ("True", ""):
            return flag
        value = value.strip("'\"")
        return f"{flag} {value}" if value else flag

    return re.sub(r"(?<![\w.\-/])([a-z_][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s,;)]*)", sub, message)


def for_cli(message: str) -> str:
    """``message`` with library parameter names rewritten as the flags of the command now running."""
    ctx = click.get_current_context(silent=True)
    return cli_message(message, _flags_of(ctx.command) if ctx is not None else {})


def user_message(e: BaseException) -> str:
    """The text of an exception as a user reads it (no class names for the common kinds)."""
    if isinstance(e, KeyError) and len(e.args) == 1:
        return f"missing key {e.args[0]!r}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip() or type(e).__name__
    if isinstance(e, (pickle.UnpicklingError, EOFError, UnicodeDecodeError)) or \
            type(e).__module__.startswith("pyarrow"):
        text = f"{type(e).__name__}: {text}"
    return text


def _debug_requested(ctx: click.Context) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("DATAPIPE_DEBUG", "") not in ("", "0")


class _Group(click.Group):
    """The root group: the one place where library errors become ``Error: <message>`` (exit 1)."""

    def _flags(self, ctx: click.Context) -> dict[str, tuple[str, bool]]:
        name = ctx.invoked_subcommand
        return _flags_of(self.commands.get(name)) if name else {}

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException as e:  # a command's own message: the same flag names
            e.message = cli_message(e.message, self._flags(ctx))
            raise
        except (click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI's single error boundary
            if _debug_requested(ctx):
                raise
            flags = self._flags(ctx)
            if isinstance(e, _USER_ERRORS + _arrow_errors()):
                raise click.ClickException(cli_message(user_message(e), flags)) from None
            raise click.ClickException(
                f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback and report it"
            ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="datapipe")
@click.option("--debug", is_flag=True, envvar="DATAPIPE_DEBUG",
              help="Show the full traceback of an error (also DATAPIPE_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """datapipe: Arrow-backed datasets, resumable loaders and paper-grade batch samplers.

    Errors print as 'Error: <message>' (exit code 1; 2 for a wrong command line); --debug shows the traceback.

    \b
    Example:
      datapipe ingest "/usr/lib/python3.11/**/*.py" --out corpus
      datapipe inspect corpus --plot lengths.png
      datapipe --debug inspect corpus
    """
    ctx.ensure_object(dict)["debug"] = debug
    if not _debug_requested(ctx):  # a warning reads as one line, without the source line it was raised from
        import warnings

        previous = warnings.formatwarning
        warnings.formatwarning = lambda message, category, *_a, **_k: f"Warning ({category.__name__}): {message}\n"
        ctx.call_on_close(lambda: setattr(warnings, "formatwarning", previous))


for _name in _COMMAND_MODULES:
    if importlib.util.find_spec(f"datapipe.cli.{_name}") is None:
        continue
    for _cmd in importlib.import_module(f"datapipe.cli.{_name}").COMMANDS:
        main.add_command(_cmd)
