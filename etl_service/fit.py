"""Do a chunk's values fit the target's ClickHouse types exactly? Pure checks on Arrow data, no I/O.

ClickHouse converts some values on insert without complaint where the result is not the value
sent: integers wrap (1000 into Int8 becomes -24), a date past a type's range is clamped (2300-01-01
into DateTime becomes 2106-02-07), digits beyond a Decimal's scale or a DateTime64's precision are
dropped (1.2345 into Decimal(10, 2) becomes 1.23), a float beyond Float32 becomes inf, NULL into a
non-Nullable column becomes the type's default. These checks catch exactly those cases before the
insert, so the row is quarantined with the reason instead of stored changed; values ClickHouse
rejects itself (an unparsable UUID, a string too long for a FixedString) come back as errors and
are handled the same way.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc

_INT = re.compile(r"^(U?)Int(8|16|32|64|128|256)$")
_DECIMAL = re.compile(r"^Decimal(?:32|64|128|256)?\((\d+),\s*(\d+)\)$")
_DATETIME64 = re.compile(r"^DateTime64\((\d+)")
_FIXED = re.compile(r"^FixedString\((\d+)\)$")

_DAY_SECONDS = 86_400
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_INT64 = (-(2**63), 2**63 - 1)
# Ranges in seconds since 1970 (UTC), and in days for the date types.
_DATETIME_SECONDS = (0, 4_294_967_295)  # 1970-01-01 .. 2106-02-07 06:28:15
_DATETIME64_SECONDS = (-2_208_988_800, 10_413_791_999)  # 1900-01-01 .. 2299-12-31 23:59:59 (and its fraction)
_DATE_DAYS = {"Date": (0, 65_535), "Date32": (-25_567, 120_529)}  # to 2149-06-06; 1900-01-01 .. 2299-12-31
_FLOAT32_MAX = 3.4028234663852886e38
_EXACT_INT = {"Float32": 2**24, "Float64": 2**53}  # integers beyond these may not be held exactly


def first_misfit(data: pa.Table, target_types: dict[str, str]) -> str | None:
    """A sentence describing the first value that would not arrive intact, or None if all fit."""
    for name in data.column_names:
        ch_type = target_types.get(name)
        if ch_type is None:
            continue
        problem = _column_misfit(data.column(name), ch_type)
        if problem:
            return f"column {name!r}: {problem}"
    return None


def _column_misfit(column: pa.ChunkedArray, ch_type: str) -> str | None:
    nullable = ch_type.startswith("Nullable(")
    inner = ch_type[len("Nullable("):-1] if nullable else ch_type
    inner = inner.removeprefix("LowCardinality(").removesuffix(")") if inner.startswith("LowCardinality(") \
        else inner
    if not nullable and column.null_count and not inner.startswith(("Array(", "Map(", "Tuple(")):
        return f"NULL into non-Nullable {ch_type}"
    if column.null_count == len(column):
        return None
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        return _range_misfit(column, inner) or _digits_misfit(column, inner)
    if pa.types.is_timestamp(kind) or pa.types.is_date32(kind):
        return _time_misfit(column, inner)
    if pa.types.is_floating(kind):
        return _float_misfit(column, inner)
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        return _string_misfit(column, inner)
    return None


def _first(column: pa.ChunkedArray, bad: pa.ChunkedArray) -> object:
    """The first value of `column` where `bad` is true."""
    return column[pc.index(bad, True).as_py()].as_py()


def _range_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    bounds = _bounds(inner)
    if bounds is None:
        return None
    low, high = bounds
    stats = pc.min_max(column)
    smallest, largest = stats["min"].as_py(), stats["max"].as_py()
    for value in (smallest, largest):
        if value is not None and not (low <= value <= high):
            return f"value {value} does not fit {inner}"
    return None


def _digits_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    """Digits after the point that the target would drop: a Decimal of smaller scale, an integer, a float."""
    if not pa.types.is_decimal(column.type):
        exact = _EXACT_INT.get(inner)
        if exact is None:
            return None
        stats = pc.min_max(column)
        if max(abs(stats["min"].as_py()), abs(stats["max"].as_py())) <= exact:
            return None
        bad = pc.not_equal(pc.cast(pc.cast(column, pa.float32() if inner == "Float32" else pa.float64(),
                                           safe=False), pa.int64(), safe=False), pc.cast(column, pa.int64()))
        return f"value {_first(column, bad)} is not held exactly by {inner}" if pc.any(bad).as_py() else None
    match = _DECIMAL.match(inner)
    scale = int(match[2]) if match else 0 if _INT.match(inner) else None
    if scale is None or column.type.scale <= scale:
        return None
    bad = pc.not_equal(pc.round(column, ndigits=scale), column)
    if pc.any(bad).as_py():
        return f"value {_first(column, bad)} has more digits after the point than {inner} keeps ({scale})"
    return None


def _time_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    """Dates and times out of the target type's range, or finer than it keeps."""
    if pa.types.is_date32(column.type):
        ticks, per_second = pc.multiply(pc.cast(pc.cast(column, pa.int32()), pa.int64()), _DAY_SECONDS), 1
    else:
        ticks, per_second = pc.cast(column, pa.int64()), _PER_SECOND[column.type.unit]
    digits = _DATETIME64.match(inner)
    if digits:
        (low, high), keep = _DATETIME64_SECONDS, max(1, per_second // 10 ** int(digits[1]))
    elif inner.startswith("DateTime"):
        (low, high), keep = _DATETIME_SECONDS, per_second
    elif inner in _DATE_DAYS:
        first, last = _DATE_DAYS[inner]
        (low, high), keep = (first * _DAY_SECONDS, (last + 1) * _DAY_SECONDS - 1), _DAY_SECONDS * per_second
    else:
        return None
    out = pc.or_(pc.less(ticks, max(low * per_second, _INT64[0])),
                 pc.greater(ticks, min((high + 1) * per_second - 1, _INT64[1])))
    if pc.any(out).as_py():
        return f"value {_first(column, out)} is out of the range of {inner}"
    if keep > 1:
        finer = pc.not_equal(pc.subtract(ticks, pc.multiply(pc.divide(ticks, keep), keep)), 0)
        if pc.any(finer).as_py():
            return f"value {_first(column, finer)} is more precise than {inner} keeps"
    return None


def _float_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    if inner == "Float32":
        finite = pc.is_finite(column)
        size = pc.abs(column)
        bad = pc.and_(finite, pc.or_(pc.greater(size, _FLOAT32_MAX), pc.and_(pc.greater(size, 0),
                                                                              pc.less(size, 1.401298464324817e-45))))
        if pc.any(bad).as_py():
            return f"value {_first(column, bad)} does not fit Float32 (it would be stored as inf or 0)"
        return None
    if _INT.match(inner) or _DECIMAL.match(inner):
        whole = _INT.match(inner) is not None
        bad = pc.invert(pc.is_finite(column))
        if whole:
            bad = pc.or_(bad, pc.not_equal(pc.floor(column), column))
        if pc.any(bad).as_py():
            return f"value {_first(column, bad)} is not held exactly by {inner}"
    return None


def _string_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    match = _FIXED.match(inner)
    if not match:
        return None
    bad = pc.greater(pc.binary_length(column), int(match[1]))
    if pc.any(bad).as_py():
        return f"value {str(_first(column, bad))[:40]!r} is longer than {inner} holds ({match[1]} bytes)"
    return None


def _bounds(ch_type: str) -> tuple[int | Decimal, int | Decimal] | None:
    match = _INT.match(ch_type)
    if match:
        bits = int(match[2])
        if match[1]:
            return 0, 2**bits - 1
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    match = _DECIMAL.match(ch_type)
    if match:
        precision, scale = int(match[1]), int(match[2])
        limit = Decimal(10) ** (precision - scale) - Decimal(1).scaleb(-scale)
        return -limit, limit
    return None
