"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a malformed record) raises a
subclass of :class:`MMTuneError`. The CLI prints those as one line, without a traceback.
"""

from __future__ import annotations


class MMTuneError(Exception):
    """An error the user can fix; printed by the CLI as one line."""


class ConfigError(MMTuneError):
    """A recipe or command-line override is invalid."""


class DataError(MMTuneError):
    """A data record is invalid. Names the file, the line (1-based) and the problem.

    ``reason`` is a short, stable key ("malformed_json", "missing_field", ...) used to count
    skipped records per reason under ``on_bad_record: skip``.
    """

    def __init__(self, path: str | None, line: int | None, problem: str, reason: str = "invalid",
                 field: str | None = None):
        self.path, self.line, self.problem, self.reason, self.field = path, line, problem, reason, field
        where = str(path) if path else "<data>"
        if line is not None:
            where += f":{line}"
        if field:
            where += f" field '{field}'"
        super().__init__(f"{where}: {problem}")
