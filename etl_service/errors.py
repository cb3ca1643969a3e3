"""The exception tree of etl-service.

    EtlError
    ├── ConfigError          bad settings: the process exits 78 (EX_CONFIG)
    ├── TransientError       marker: retry later (server unreachable, timeout, lock lost)
    │   ├── SourceUnavailable    PostgreSQL could not be reached or dropped the connection
    │   ├── SourceChanged        the source table changed shape mid-run: start over with the new shape
    │   ├── SourceConflict       PostgreSQL chose the statement as a deadlock's victim: do it again
    │   └── SinkUnavailable      ClickHouse could not be reached or dropped the connection
    ├── SourceError          PostgreSQL refused a statement (missing table, bad SQL, ...)
    │   ├── BadSourceValues      (RowError) a value could not be converted to its column type
    │   └── MarkNotKept          a trigger or row security policy resets or refuses the mark: the job stops
    ├── TransformError       (RowError) the user transform failed or returned something unusable
    ├── TransformContractError  the transform changed, dropped or repeated keys: the run fails
    ├── UnknownBatch         (LookupError) `adopt` / `release` named a batch that is not another job's
    ├── SinkError            ClickHouse refused a statement or an insert
    │   └── BadSinkValues        (RowError) a value does not fit the target column
    └── RowError             marker: some rows' data is the problem — the chunk is split until
                             the bad rows are found, and those are quarantined

Driver exceptions are translated at the I/O boundary (`postgres.connection`, `clickhouse.clients`) with `from exc`,
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


class UnknownBatch(EtlError, LookupError):
    """An operator command named a batch the ledger does not hold in the state the command needs."""


class RowError(EtlError):
    """Marker: the data of one or more rows caused this; other rows of the chunk may be fine."""


class TransientError(EtlError):
    """Marker: the same operation may succeed later (the run is retried with backoff)."""


class SourceError(EtlError):
    """PostgreSQL refused what we asked."""


class MarkNotKept(SourceError):
    """The mark did not stick on rows already in ClickHouse: they are set aside, and the job stops until fixed."""


class SourceUnavailable(SourceError, TransientError):
    """PostgreSQL could not be reached, or the connection broke."""


class SourceChanged(SourceError, TransientError):
    """The source table's columns changed since the run described it; the retry describes it again."""


class SourceConflict(SourceError, TransientError):
    """PostgreSQL rolled the statement back to end a deadlock or a serialization conflict with other
    transactions (the application's): nothing of it stayed, and doing it again is safe."""


class BadSourceValues(SourceError, RowError):
    """Extracted text could not be converted to the column's type (e.g. date 'infinity')."""


class SinkError(EtlError):
    """ClickHouse refused what we asked."""


class BadSinkValues(SinkError, RowError):
    """A value does not fit its target column (out of range, NULL into non-Nullable, unparsable)."""


class SinkUnavailable(SinkError, TransientError):
    """ClickHouse could not be reached, or the connection broke."""


class TransformContractError(EtlError):
    """The transform broke its contract on keys: a bug in the transform, never a bad row."""


class TransformError(RowError):
    """The user transform raised, or returned something that is not a usable DataFrame."""
