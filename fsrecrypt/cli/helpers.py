"""What the commands share: the --user option, services, JSON output, progress, confirm.

Everything that talks to the operator lives here, not in the domain:
``fsrecrypt.lifecycle`` hands back results and accepts callbacks, and these
helpers turn them into output, a progress bar (tqdm, stderr, terminals
only) and an interactive confirmation.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from fsrecrypt.cli import State

if TYPE_CHECKING:  # pragma: no cover
    from fsrecrypt.pipeline import Services

F = Callable[..., Any]

user_option: Callable[[F], F] = click.option(
    "--user",
    "user_id",
    default=None,
    help="Operator id for the audit log (default: cli:<OS user>).",
)


def services_for(ctx: click.Context) -> Services:
    """The pipeline's services for this invocation's configuration (close them when done)."""
    return ctx.ensure_object(State).services()


def default_user() -> str:
    """``cli:<OS user>`` (``cli:uid<N>`` when the uid has no name): who ran the command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


def operator(user_id: str | None) -> str:
    """The ``--user`` given, or ``cli:<OS user>``."""
    return user_id or default_user()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


class ProgressBar:
    """A ``progress(done, total)`` callback drawn as a tqdm bar on stderr.

    The bar appears at the first call (when the total is known), is shown on
    terminals only (``disable=None``) so cron logs stay clean, and vanishes
    on ``close()`` (``leave=False``).
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=self.desc, unit="rec", file=sys.stderr, disable=None, leave=False
            )
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def confirm_or_abort(question: Callable[[Sequence[Any]], str]) -> Callable[[Sequence[Any]], None]:
    """A ``confirm`` callback that asks ``question(items)`` and aborts unless answered yes."""

    def confirm(items: Sequence[Any]) -> None:
        click.confirm(question(items), abort=True, err=True)

    return confirm
