"""Exceptions with one-line messages that the CLI turns into exit codes."""

from __future__ import annotations


class ArgsError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class UsageError(ArgsError):
    """Unusable input: unknown flag, unreadable file, malformed value. Exit code 2.

    ``problems`` holds every problem found (one line each), so all are reported at once.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class SchemaError(ArgsError):
    """The packaged parameter data is inconsistent (a bug in mindspeed-args, not user input)."""

    exit_code = 3


class ConfigError(ArgsError):
    """The configuration parsed but broke validation rules. Exit code 1.

    ``report`` is the :class:`mindspeed_args.report.Report` with every violation.
    """

    exit_code = 1

    def __init__(self, report):
        self.report = report
        super().__init__(f"{len(report.violations)} violation(s): " + "; ".join(v.one_line() for v in report.violations))
