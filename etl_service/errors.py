"""The exception tree of etl-service.

    EtlError
    ├── ConfigError          bad settings: the process exits 78 (EX_CONFIG)
    ├── TransientError       marker: retry later (server unreachable, timeout, lock lost)
    │   ├── SourceUnavailable    PostgreSQL could not be reached or dropped the connection
    │   └── SinkUnavailable      ClickHouse could not be reached or dropped the connection
    ├── SourceError          PostgreSQL refused a statement (missing table, bad SQL, ...)
    ├── TransformError       the user transform failed or returned something unusable
    └── SinkError            ClickHouse refused a statement or an insert

Driver exceptions are translated at the I/O boundary (`source`, `sink`) with `from exc`,
and messages never carry a password: DSNs are redacted before they reach any text.
"""

from __future__ import annotations


class EtlError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(EtlError, ValueError):
    """A setting is missing or invalid; `variable` names it so the operator can fix it."""

    def __init__(self, variable: str, problem: str, fix: str = "") -> None:
        self.variable = variable
        self.problem = problem
        self.fix = fix
        text = f"{variable}: {problem}"
        if fix:
            text += f" — {fix}"
        super().__init__(text)


class TransientError(EtlError):
    """Marker: the same operation may succeed later (the run is retried with backoff)."""


class SourceError(EtlError):
    """PostgreSQL refused what we asked."""


class SourceUnavailable(SourceError, TransientError):
    """PostgreSQL could not be reached, or the connection broke."""


class SinkError(EtlError):
    """ClickHouse refused what we asked."""


class SinkUnavailable(SinkError, TransientError):
    """ClickHouse could not be reached, or the connection broke."""


class TransformError(EtlError):
    """The transform step failed for a whole chunk."""
