"""Progress bars that read well both in a terminal and in a job's log file.

Every workflow job writes its output to ``results/logs/...`` (stderr is a file, not a terminal).
A tqdm bar there is one long line of carriage-return updates, ten per second. :func:`bar` keeps
tqdm's bar on a terminal and, anywhere else, prints one plain line per update, at most every
``POISONFLOW_PROGRESS_INTERVAL`` seconds (default 30), plus the first and the last state::

    from poisonflow.progress import bar

    for epoch in bar(range(epochs), desc="victim", unit="epoch"):
        ...

It takes tqdm's arguments and returns a tqdm object (``set_postfix``, ``update``, ``close`` and
``with`` work as usual). Importing this module imports tqdm only.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

ENV_INTERVAL = "POISONFLOW_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]{postfix}"


class LineWriter:
    """A file for tqdm that turns its carriage-return redraws into whole lines (blank redraws and
    repeats of the previous line dropped)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            line = part.rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class PlainBar(std_tqdm):
    """tqdm whose postfix and description changes wait for the next timed line instead of
    printing one each (a per-batch ``set_postfix`` would otherwise write a line per batch)."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=False):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=False):
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc=None, refresh=False):
        super().set_description_str(desc, refresh=False)


def interval() -> float:
    """Seconds between two plain-line updates (``POISONFLOW_PROGRESS_INTERVAL``)."""
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(iterable: Iterable | None = None, *, file=None, **kwargs: Any) -> std_tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; plain timed lines elsewhere (a log file)."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, file=stream, **kwargs)
    every = interval()
    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("ncols", None)
    kwargs["leave"] = True  # the last state is the line a log reader wants
    kwargs.setdefault("mininterval", every)
    kwargs.setdefault("maxinterval", max(every, 10.0))
    kwargs.setdefault("miniters", 1)
    kwargs.setdefault("desc", "progress")
    total = kwargs.get("total")
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    kwargs.setdefault("bar_format", PLAIN_FORMAT if total is not None else PLAIN_FORMAT_NO_TOTAL)
    return PlainBar(iterable, file=LineWriter(stream), ascii=True, **kwargs)
