"""Verification on a Replicated target: a count below the rows sent may come from a replica still
fetching parts; it syncs and counts again before it fails. (No Replicated table can run here: the
branch is driven with a stand-in for the target and the count, as a load balancer would answer.)"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from etl_service.clickhouse import readback
from etl_service.errors import EtlError
from etl_service.run.loading import VERIFY_WAITS, BatchLoader


def loader(replicated: bool, counts: list[int], monkeypatch: pytest.MonkeyPatch) -> tuple[BatchLoader, list[str]]:
    """A loader whose target answers `counts` one after the other; returns it and the calls made."""
    calls: list[str] = []
    answers = iter(counts)
    monkeypatch.setattr(readback, "batch_rows", lambda *_: calls.append("count") or next(answers))
    monkeypatch.setattr(readback, "sync_replica", lambda *_: calls.append("sync"))
    monkeypatch.setattr(readback, "doubled_keys", lambda *_: ["id=7 (2 copies)"])
    waits: list[float] = []
    stop = SimpleNamespace(wait=lambda seconds: waits.append(seconds) or False, is_set=lambda: False)
    made = BatchLoader.__new__(BatchLoader)
    made.job = SimpleNamespace(verify_load=True, target_table="t")
    made.ctx = SimpleNamespace(settings=SimpleNamespace(clickhouse=SimpleNamespace(database="db")), stop=stop)
    made.target = SimpleNamespace(connect=lambda _shape: object(), has_batch_column=True, replicated=replicated)
    made._waits = waits  # type: ignore[attr-defined]  # the backoff it waited, in seconds
    return made, calls


def verify(made: BatchLoader, expected: int) -> Any:
    shape = SimpleNamespace(key_targets=("id",))
    batch = SimpleNamespace(batch_id=3)
    return made._verify(shape, batch, expected)  # type: ignore[arg-type]


def test_a_replica_behind_is_synced_and_counted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    made, calls = loader(True, [60, 90, 100], monkeypatch)
    verify(made, 100)
    assert calls == ["count", "sync", "count", "sync", "count"]
    assert made._waits == [1.0, 2.0]  # type: ignore[attr-defined]


def test_a_replica_that_never_catches_up_fails_as_missing_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    made, calls = loader(True, [60] * (VERIFY_WAITS + 1), monkeypatch)
    with pytest.raises(EtlError, match="40 are missing"):
        verify(made, 100)
    assert calls.count("sync") == VERIFY_WAITS


def test_a_single_server_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    made, calls = loader(False, [60], monkeypatch)
    with pytest.raises(EtlError, match="40 are missing"):
        verify(made, 100)
    assert "sync" not in calls


def test_too_many_rows_fail_at_once_naming_the_doubled_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    made, calls = loader(True, [120], monkeypatch)
    with pytest.raises(EtlError, match=r"id=7 \(2 copies\) are there more than once") as err:
        verify(made, 100)
    assert "sync" not in calls and "ETL_VERIFY_LOAD" not in str(err.value)


def test_the_stop_event_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    made, _ = loader(True, [60, 60], monkeypatch)
    made.ctx.stop = threading.Event()  # type: ignore[misc]
    made.ctx.stop.set()
    with pytest.raises(EtlError, match="40 are missing"):
        verify(made, 100)
