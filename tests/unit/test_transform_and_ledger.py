"""User transforms, chunk arithmetic and insert tokens (pure logic, no servers)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from etl_service.clickhouse.target_table import table_name
from etl_service.errors import TransformError
from etl_service.ledger import Batch
from etl_service.run import transform
from etl_service.settings import declared


@pytest.fixture
def user_module(tmp_path: Path) -> str:
    (tmp_path / "user_tx.py").write_text(
        "def double(df):\n    df['amount'] = df['amount'] * 2\n    df['tag'] = 'x'\n    return df\n"
        "def boom(df):\n    raise KeyError('customer')\n"
        "def wrong(df):\n    return [1, 2]\n")
    sys.path.insert(0, str(tmp_path))
    yield "user_tx"
    sys.path.remove(str(tmp_path))
    sys.modules.pop("user_tx", None)
    declared.load_user_function.cache_clear()


def test_user_function_transforms_with_exact_types(user_module: str) -> None:
    table = pa.table({"id": pa.array([1, 2], pa.int64()),
                      "amount": pa.array([Decimal("1.10"), None], pa.decimal128(12, 2))})
    out = transform.apply(table, f"{user_module}:double")
    assert out.to_pylist() == [{"id": 1, "amount": Decimal("2.20"), "tag": "x"},
                               {"id": 2, "amount": None, "tag": "x"}]


def test_no_user_function_returns_the_same_table() -> None:
    table = pa.table({"id": [1]})
    assert transform.apply(table, "") is table


@pytest.mark.parametrize(("func", "words"), [("boom", "raised KeyError"), ("wrong", "returned list")])
def test_user_function_failures_become_transform_errors(user_module: str, func: str, words: str) -> None:
    with pytest.raises(TransformError, match=words):
        transform.apply(pa.table({"id": [1]}), f"{user_module}:{func}")


def batch(rows: int, chunk: int, origin: str = "orders") -> Batch:
    return Batch(7, "claimed", rows, chunk, 0, 0, datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC), origin=origin)


def test_chunks_cover_every_position_once() -> None:
    b = batch(1001, 250)
    assert b.chunk_count == 5
    bounds = [b.chunk_bounds(i) for i in range(b.chunk_count)]
    assert bounds == [(1, 250), (251, 500), (501, 750), (751, 1000), (1001, 1001)]


def test_tokens_are_deterministic_and_distinct() -> None:
    b = batch(10, 5)
    assert b.range_token(1, 5) == batch(10, 5).range_token(1, 5)
    tokens = {batch(10, 5, job).range_token(lo, hi) for job in ("orders", "payments")
              for lo, hi in ((1, 5), (6, 10), (1, 3))}
    assert len(tokens) == 6
    later = Batch(7, "claimed", 10, 5, 0, 0, datetime(2027, 1, 1, tzinfo=UTC), origin="orders")  # recreated ledger
    assert later.range_token(1, 5) != b.range_token(1, 5)


def test_clickhouse_names_are_backquoted() -> None:
    assert table_name("db", "t`; DROP TABLE x") == "`db`.`t\\`; DROP TABLE x`"
