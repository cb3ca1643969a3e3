"""Values a narrower ClickHouse type cannot hold exactly are found before the insert, never changed."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from etl_service.clickhouse.fit import Ranges, first_misfit

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
    ([None], pa.string(), "LowCardinality(String)", "NULL into non-Nullable"),
    # floats into decimals and integers: range and digits
    ([1.2345], pa.float64(), "Decimal(10, 2)", "not held exactly by Decimal(10, 2)"),
    ([3e9], pa.float64(), "Decimal(10, 2)", "does not fit Decimal(10, 2)"),
    ([3e9], pa.float64(), "Int32", "does not fit Int32"),
    ([-1.0], pa.float64(), "UInt8", "does not fit UInt8"),
    # decimals into floats
    ([Decimal("1e39")], pa.decimal256(40, 0), "Float32", "does not fit Float32"),
    ([Decimal("123456789.123")], pa.decimal128(12, 3), "Float32", "not held exactly by Float32"),
    ([Decimal("12345678901234567.89")], pa.decimal128(20, 2), "Float64", "not held exactly by Float64"),
    # numbers ClickHouse reads as a Bool, seconds, days, or an Enum's value
    ([2], pa.int16(), "Bool", "does not fit Bool"),
    ([-5], pa.int64(), "DateTime('UTC')", "does not fit DateTime('UTC')"),
    ([5_000_000_000], pa.int64(), "DateTime", "does not fit DateTime"),
    ([70_000], pa.int32(), "Date", "does not fit Date"),
    ([3], pa.int32(), "Enum8('a' = 1, 'b' = 2)", "not a value of Enum8"),
    ([2e-45], pa.float64(), "Float32", "does not fit Float32"),
    ([16777217.0], pa.float64(), "Float32", "not held exactly by Float32"),
    ([0.1], pa.float64(), "Nullable(Float32)", "not held exactly by Float32"),
    ([1e-39], pa.float64(), "Float32", "does not fit Float32"),
    # the elements of arrays
    ([[1, 2], [300]], pa.list_(pa.int64()), "Array(Int8)", "an element: value 300 does not fit Int8"),
    ([[1, None]], pa.list_(pa.int64()), "Array(Int8)", "an element: NULL into non-Nullable Int8"),
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
    ([3.4028234663852886e38, -3.4028234663852886e38, 0.0, float("inf"), float("nan")], pa.float64(), "Float32"),
    ([2.0, -7.0], pa.float64(), "Int32"),
    ([2**24, -(2**24)], pa.int64(), "Float32"),
    ([2**53], pa.int64(), "Float64"),
    (["abc", "é"], pa.string(), "FixedString(3)"),
    (["anything"], pa.string(), "String"),
    ([127, -128], pa.int64(), "Int8"),
    ([0, 1], pa.int16(), "Bool"),
    ([0, 4_294_967_295], pa.int64(), "DateTime('UTC')"),
    ([1, 2, None], pa.int32(), "Nullable(Enum8('a' = 1, 'b' = 2))"),
    ([2.0 ** -126, 0.5, -3.25, float("nan"), float("inf")], pa.float64(), "Float32"),  # exactly Float32 values
    ([None, "x"], pa.string(), "LowCardinality(Nullable(String))"),
    ([None, "x"], pa.string(), "Nullable(LowCardinality(String))"),
    ([0.1, 1.25, -99999999.99], pa.float64(), "Decimal(10, 2)"),
    ([2147483647.0], pa.float64(), "Int32"),
    ([Decimal("1.10"), Decimal("-2.5")], pa.decimal128(12, 2), "Float32"),
    ([Decimal("123456789.123")], pa.decimal128(12, 3), "Float64"),
    ([[1, 2], [], None], pa.list_(pa.int64()), "Array(Int8)"),
    ([[1, None]], pa.list_(pa.int64()), "Array(Nullable(Int8))"),
])
def test_values_a_type_holds_exactly_pass(values: list[object], arrow: pa.DataType, ch_type: str) -> None:
    assert misfit(values, arrow, ch_type) is None


def test_the_first_misfit_names_the_column_and_the_value() -> None:
    data = pa.table({"ok": pa.array([1, 2]), "when": pa.array([datetime(2026, 1, 1, tzinfo=UTC),
                                                               datetime(2400, 1, 1, tzinfo=UTC)], TS)})
    found = first_misfit(data, {"ok": "Int64", "when": "DateTime('UTC')"})
    assert found is not None and found.startswith("column 'when': value 2400-01-01 00:00:00+00:00 is out of the range")


WIDE = Ranges((-719_162, 2_932_896), (-62_135_596_800, 253_402_300_799))  # 0001-01-01 .. 9999-12-31


@pytest.mark.parametrize(("value", "arrow", "ch_type"), [
    (date(1, 1, 1), pa.date32(), "Date32"),
    (date(9999, 12, 31), pa.date32(), "Date32"),
    (datetime(1, 1, 1, tzinfo=UTC), TS, "DateTime64(6, 'UTC')"),
    (datetime(2500, 1, 1, tzinfo=UTC), TS, "DateTime64(6, 'UTC')"),
])
def test_the_ranges_are_the_servers(value: object, arrow: pa.DataType, ch_type: str) -> None:
    """A server that holds 0001..9999 takes what an older one (1900..2299) would clamp."""
    data = pa.table({"v": pa.array([value], arrow)})
    assert first_misfit(data, {"v": ch_type}, WIDE) is None
    found = first_misfit(data, {"v": ch_type})
    assert found is not None and "out of the range" in found
