"""Values a narrower ClickHouse type cannot hold exactly are found before the insert, never changed."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from etl_service.fit import first_misfit

TS = pa.timestamp("us", tz="UTC")


def misfit(values: list[object], arrow: pa.DataType, ch_type: str) -> str | None:
    return first_misfit(pa.table({"v": pa.array(values, arrow)}), {"v": ch_type})


@pytest.mark.parametrize(("values", "arrow", "ch_type", "said"), [
    ([datetime(2300, 1, 1, tzinfo=UTC)], TS, "DateTime('UTC')", "out of the range of DateTime('UTC')"),
    ([datetime(1899, 12, 31, tzinfo=UTC)], TS, "DateTime", "out of the range of DateTime"),
    ([datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC)], TS, "DateTime('UTC')", "more precise than DateTime('UTC')"),
    ([datetime(2026, 1, 1, 0, 0, 0, 1500, tzinfo=UTC)], TS, "DateTime64(3, 'UTC')", "more precise"),
    ([datetime(1899, 12, 31, 23, 59, 59, tzinfo=UTC)], TS, "DateTime64(6, 'UTC')", "out of the range"),
    ([datetime(2300, 1, 1, tzinfo=UTC)], TS, "Nullable(DateTime64(6, 'UTC'))", "out of the range"),
    ([datetime(2026, 1, 1, 12, tzinfo=UTC)], TS, "Date", "more precise than Date"),
    ([date(1969, 12, 31)], pa.date32(), "Date", "out of the range of Date"),
    ([date(2149, 6, 7)], pa.date32(), "Date", "out of the range of Date"),
    ([date(2300, 1, 1)], pa.date32(), "Date32", "out of the range of Date32"),
    ([date(1960, 1, 1)], pa.date32(), "DateTime", "out of the range of DateTime"),
    ([Decimal("1.2345")], pa.decimal128(12, 4), "Decimal(10, 2)", "more digits after the point"),
    ([Decimal("1.5")], pa.decimal128(12, 1), "Int64", "more digits after the point"),
    ([Decimal("123456789.00")], pa.decimal128(12, 2), "Decimal(10, 2)", "does not fit"),
    ([1e300], pa.float64(), "Float32", "does not fit Float32"),
    ([-1e-300], pa.float64(), "Float32", "does not fit Float32"),
    ([1.5], pa.float64(), "Int32", "not held exactly"),
    ([float("nan")], pa.float64(), "Int32", "not held exactly"),
    ([2**24 + 1], pa.int64(), "Float32", "not held exactly by Float32"),
    ([2**53 + 1], pa.int64(), "Float64", "not held exactly by Float64"),
    (["abcd"], pa.string(), "FixedString(3)", "longer than FixedString(3)"),
    (["é"], pa.string(), "FixedString(1)", "longer than FixedString(1)"),
    ([1000], pa.int64(), "Int8", "does not fit Int8"),
    ([None], pa.int64(), "Int64", "NULL into non-Nullable"),
])
def test_values_a_narrower_type_would_change_are_found(values: list[object], arrow: pa.DataType, ch_type: str,
                                                       said: str) -> None:
    found = misfit([None, *values, None] if ch_type.startswith("Nullable") else values, arrow, ch_type)
    assert found is not None and said in found, found


@pytest.mark.parametrize(("values", "arrow", "ch_type"), [
    ([datetime(1970, 1, 1, tzinfo=UTC), datetime(2106, 2, 7, 6, 28, 15, tzinfo=UTC)], TS, "DateTime('UTC')"),
    ([datetime(1900, 1, 1, tzinfo=UTC), datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)], TS,
     "DateTime64(6, 'UTC')"),
    ([datetime(2026, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)], TS, "DateTime64(3)"),
    ([datetime(2026, 1, 1, tzinfo=UTC)], TS, "Date"),
    ([date(1970, 1, 1), date(2149, 6, 6)], pa.date32(), "Date"),
    ([date(1900, 1, 1), date(2299, 12, 31)], pa.date32(), "Date32"),
    ([Decimal("1.2300")], pa.decimal128(12, 4), "Decimal(10, 2)"),
    ([Decimal("-99999999.99")], pa.decimal128(12, 2), "Decimal(10, 2)"),
    ([Decimal("7.0")], pa.decimal128(12, 1), "Int64"),
    ([3.4e38, -3.4e38, 0.0, float("inf"), float("nan")], pa.float64(), "Float32"),
    ([2.0, -7.0], pa.float64(), "Int32"),
    ([2**24, -(2**24)], pa.int64(), "Float32"),
    ([2**53], pa.int64(), "Float64"),
    (["abc", "é"], pa.string(), "FixedString(3)"),
    (["anything"], pa.string(), "String"),
    ([127, -128], pa.int64(), "Int8"),
])
def test_values_a_type_holds_exactly_pass(values: list[object], arrow: pa.DataType, ch_type: str) -> None:
    assert misfit(values, arrow, ch_type) is None


def test_the_first_misfit_names_the_column_and_the_value() -> None:
    data = pa.table({"ok": pa.array([1, 2]), "when": pa.array([datetime(2026, 1, 1, tzinfo=UTC),
                                                               datetime(2400, 1, 1, tzinfo=UTC)], TS)})
    found = first_misfit(data, {"ok": "Int64", "when": "DateTime('UTC')"})
    assert found is not None and found.startswith("column 'when': value 2400-01-01 00:00:00+00:00 is out of the range")
