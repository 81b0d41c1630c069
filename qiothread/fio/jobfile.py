"""fio job files (INI) for the common subset.

fio's job file grammar, as ``init.c`` reads it:

- ``[name]`` starts a job; ``[global]`` starts a section whose options
  apply to every job *after* it (a later ``[global]`` adds to, and
  overrides, the earlier one for the jobs that follow);
- ``key=value`` or a bare ``key`` (a flag) per line; blanks around
  ``=`` do not matter; ``;`` and ``#`` start comments, at the start of
  a line or after the value;
- ``${VAR}`` is replaced by the environment variable ``VAR``;
- an option before any section is an error.

Each job runs as one guest process here (``numjobs`` clones it), so a
job file maps onto guests one job to a guest.  ``include`` directives
and fio's arithmetic expressions are not supported and are refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from qiothread.fio.options import FioOptionError, JobOptions

__all__ = ["JobFile", "load_jobfile", "parse_jobfile"]

_SECTION_RE = re.compile(r"^\[([^\]]*)\]$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class JobFile:
    """A parsed job file: its jobs and the ``[global]`` options."""

    #: The ``[global]`` options as written, for fio's
    #: ``"global options"`` JSON object.
    global_options: tuple[tuple[str, str], ...]
    #: One entry per ``[job]`` section, globals applied.
    jobs: tuple[JobOptions, ...]


def _strip_comment(line: str) -> str:
    for mark in (";", "#"):
        cut = line.find(mark)
        if cut >= 0:
            line = line[:cut]
    return line.strip()


def _expand_env(text: str, env: Mapping[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        if var not in env:
            raise FioOptionError(
                f"{where}: environment variable {var} is not set")
        return env[var]
    return _ENV_RE.sub(sub, text)


def parse_jobfile(text: str, source: str = "<jobfile>",
                  env: Mapping[str, str] | None = None) -> JobFile:
    """Parse fio job file ``text``.

    :param source: the file name, for error messages.
    :param env: variables for ``${VAR}``; the process environment
        by default.
    :raises FioOptionError: a malformed line, an option outside any
        section, an unknown option or a bad value; the message starts
        with ``source:line:``.
    """
    variables = os.environ if env is None else env
    base = JobOptions()
    global_given: list[tuple[str, str]] = []
    jobs: list[JobOptions] = []
    # The section being read: None before the first one, "global", or
    # a job being built as (name, pairs, first line).
    section: str | None = None
    pending: list[tuple[str, str | None]] = []
    job_line = 0

    def finish_job() -> None:
        if section is None or section == "global":
            return
        where = f"{source}:{job_line}"
        try:
            job = base.with_options([("name", section), *pending])
        except FioOptionError as err:
            raise FioOptionError(f"{where}: job '{section}': {err}") \
                from None
        # A job's "job options" are what its own section says (fio
        # reports the globals once, and the name as the job's name).
        own: dict[str, str] = {}
        for key, value in pending:
            if value is not None:
                own.pop(key, None)
                own[key] = value
        jobs.append(dataclasses.replace(job, given=tuple(own.items())))

    for lineno, raw in enumerate(text.splitlines(), start=1):
        where = f"{source}:{lineno}"
        line = _strip_comment(raw)
        if not line:
            continue
        header = _SECTION_RE.match(line)
        if header:
            finish_job()
            name = header.group(1).strip()
            if not name:
                raise FioOptionError(f"{where}: empty section name []")
            section, pending, job_line = name, [], lineno
            continue
        if line.startswith("include ") or line == "include":
            raise FioOptionError(
                f"{where}: 'include' is not supported; merge the files")
        if section is None:
            raise FioOptionError(
                f"{where}: fio: option <{line}> outside of [] job "
                "section")
        key, sep, value = line.partition("=")
        key = key.strip()
        if not key or " " in key:
            raise FioOptionError(f"{where}: not an option line: {raw!r}")
        pair = (key, _expand_env(value.strip(), variables, where)
                if sep else None)
        if section == "global":
            try:
                base = base.with_options([pair])
            except FioOptionError as err:
                raise FioOptionError(f"{where}: {err}") from None
            if pair[1] is not None:
                global_given = [(k, v) for k, v in global_given
                                if k != key]
                global_given.append((key, pair[1]))
        else:
            pending.append(pair)
            # Parse as we go, so that a bad value is reported at its
            # own line; combinations are checked when the job ends.
            try:
                base.with_options([("name", section), *pending],
                                  check=False)
            except FioOptionError as err:
                raise FioOptionError(f"{where}: job '{section}': {err}") \
                    from None
    finish_job()
    if not jobs:
        raise FioOptionError(f"{source}: no job sections found")
    return JobFile(global_options=tuple(global_given), jobs=tuple(jobs))


def load_jobfile(path: str | os.PathLike[str]) -> JobFile:
    """Read and parse the job file at ``path``.

    :raises FioOptionError: as :func:`parse_jobfile`, or the file
        cannot be read.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise FioOptionError(
            f"fio: unable to open '{p}' job file: {err.strerror}") \
            from None
    return parse_jobfile(text, source=str(p))
