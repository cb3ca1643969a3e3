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

import ipaddress
import re
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC
from decimal import Context, Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
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
_DATE_DAYS = (0, 65_535)  # Date: 1970-01-01 .. 2149-06-06
_FLOAT32_MAX = 3.4028234663852886e38
_EXACT_INT = {"Float32": 2**24, "Float64": 2**53}  # integers beyond these may not be held exactly


@dataclass(frozen=True)
class Ranges:
    """The date and time ranges of the server's extended types (they widened in ClickHouse 26.x)."""

    date32_days: tuple[int, int] = (-25_567, 120_529)  # 1900-01-01 .. 2299-12-31
    datetime64_seconds: tuple[int, int] = (-2_208_988_800, 10_413_791_999)  # the same, to the second


NARROW = Ranges()
# What the server keeps of the widest dates: it clamps what it cannot hold to its range's ends.
RANGES_QUERY = ("SELECT toInt32(toDate32('0001-01-01')), toInt32(toDate32('9999-12-31')),"
                " toUnixTimestamp64Second(toDateTime64('0001-01-01 00:00:00', 0, 'UTC')),"
                " toUnixTimestamp64Second(toDateTime64('9999-12-31 23:59:59', 0, 'UTC'))")


def ranges_from(row: Sequence[Any]) -> Ranges:
    """The server's ranges from its answer to RANGES_QUERY."""
    return Ranges((int(row[0]), int(row[1])), (int(row[2]), int(row[3])))


def unwrap(ch_type: str) -> tuple[str, bool]:
    """(the type inside Nullable / LowCardinality in any order, whether it takes NULL)."""
    nullable = False
    while True:
        for wrapper in ("Nullable(", "LowCardinality("):
            if ch_type.startswith(wrapper) and ch_type.endswith(")"):
                nullable = nullable or wrapper == "Nullable("
                ch_type = ch_type[len(wrapper):-1]
                break
        else:
            return ch_type, nullable


def first_misfit(data: pa.Table, target_types: dict[str, str], ranges: Ranges = NARROW) -> str | None:
    """A sentence describing the first value that would not arrive intact, or None if all fit."""
    for name in data.column_names:
        ch_type = target_types.get(name)
        if ch_type is None:
            continue
        problem = _column_misfit(data.column(name), ch_type, ranges)
        if problem:
            return f"column {name!r}: {problem}"
    return None


def _column_misfit(column: pa.ChunkedArray, ch_type: str, ranges: Ranges) -> str | None:
    inner, nullable = unwrap(ch_type)
    if not nullable and column.null_count and not inner.startswith(("Array(", "Map(", "Tuple(")):
        return f"NULL into non-Nullable {ch_type}"
    if column.null_count == len(column):
        return None
    kind = column.type
    refused = unchecked(kind, ch_type)
    if refused:
        return refused
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and inner.startswith("Array("):
        elements = pa.chunked_array([chunk.flatten() for chunk in column.chunks], kind.value_type)
        problem = _column_misfit(elements, inner[len("Array("):-1], ranges) if len(elements) else None
        return f"an element: {problem}" if problem else None
    if pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        return _number_misfit(column, inner)
    if pa.types.is_timestamp(kind) or pa.types.is_date32(kind):
        return _time_misfit(column, inner, ranges)
    if pa.types.is_floating(kind):
        return _float_misfit(column, inner)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _string_misfit(column, inner) or _text_misfit(column, inner, ranges)
    if pa.types.is_binary(kind):
        return _string_misfit(column, inner)
    return None




def _source_kind(kind: pa.DataType) -> str:
    for name, test in (("bool", pa.types.is_boolean), ("integer", pa.types.is_integer),
                       ("decimal", pa.types.is_decimal), ("float", pa.types.is_floating),
                       ("date", pa.types.is_date32), ("timestamp", pa.types.is_timestamp),
                       ("text", lambda k: pa.types.is_string(k) or pa.types.is_large_string(k)),
                       ("bytes", lambda k: pa.types.is_binary(k) or pa.types.is_large_binary(k))):
        if test(kind):
            return name
    return str(kind)


def _target_kind(inner: str) -> str:
    match = _INT.match(inner)
    if match:
        return "integer" if int(match[2]) <= 64 else "wide integer"
    if inner == "String":
        return "String"
    if _FIXED.match(inner):
        return "FixedString"
    if _DECIMAL.match(inner):
        return "decimal"
    if inner in ("Float32", "Float64", "Bool", "UUID", "IPv4", "IPv6", "Date", "Date32", "DateTime"):
        return inner
    if inner.startswith("DateTime64"):
        return "DateTime64"
    if inner.startswith("DateTime("):
        return "DateTime"
    if inner.startswith("Enum"):
        return "Enum"
    return inner.split("(", 1)[0]


# The value kinds each ClickHouse type is checked for here, value by value; ClickHouse converts other
# pairs its own way (a number into a UUID, a date into an Int, text into a Map or a Tuple, bytes into
# anything but a string), which no check here can vouch for.
_CHECKED = {
    "String": {"integer", "decimal", "float", "bool", "date", "timestamp", "text", "bytes"},
    "FixedString": {"text", "bytes"},
    "integer": {"integer", "decimal", "float", "bool", "text"},
    "wide integer": {"integer", "decimal", "bool", "text"},  # ClickHouse makes a float's digits up
    "decimal": {"integer", "decimal", "float", "text"},
    "Float32": {"integer", "decimal", "float", "text"},
    "Float64": {"integer", "decimal", "float", "text"},
    "Bool": {"bool", "integer", "decimal", "text"},
    "Date": {"date", "timestamp", "integer", "text"},
    "Date32": {"date", "timestamp", "text"},
    "DateTime": {"date", "timestamp", "integer", "text"},
    "DateTime64": {"date", "timestamp", "text"},
    "UUID": {"text"},
    "IPv4": {"text"},
    "IPv6": {"text"},
    "Enum": {"integer", "text"},
}


def unchecked(kind: pa.DataType, ch_type: str) -> str | None:
    """Why values of Arrow type `kind` cannot be vouched for in a column of `ch_type` (None: they can).

    Strings take numbers, dates, times and text (ClickHouse writes a value's text); arrays go element by
    element.
    """
    inner = unwrap(ch_type)[0]
    source = _source_kind(kind)
    if inner == "String" and pa.types.is_list(kind):  # read as PostgreSQL's text of the array (run.chunk)
        return None
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if inner.startswith("Array("):
            return unchecked(kind.value_type, inner[len("Array("):-1])
        return f"an array into {inner}"
    if inner.startswith("Array("):
        return f"{source} values into {inner} (not an array)"
    allowed = _CHECKED.get(_target_kind(inner))
    if allowed is None or source not in allowed:
        return (f"{source} values into {inner}: ClickHouse converts them its own way, which this service cannot"
                " check value by value")
    return None


def _number_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    if inner.startswith("Enum"):
        return _enum_misfit(column, inner)
    if pa.types.is_decimal(column.type) and inner == "Bool":
        bad = pc.invert(pc.is_in(column, value_set=pa.array([Decimal(0), Decimal(1)], column.type)))
        return f"value {_first(column, bad)} is not a boolean (0 or 1)" if pc.any(bad).as_py() else None
    return _range_misfit(column, inner) or _digits_misfit(column, inner)


def prepared(data: pa.Table, target_types: dict[str, str]) -> pa.Table:
    """The chunk as ClickHouse should receive it, once `first_misfit` found nothing: text for a number,
    date or time column read here into that type (ClickHouse's own reading of it on insert is not always
    exact: float text can arrive as a neighbouring float), and dates for a DateTime column as times (UTC
    midnight, as every time without a zone is taken). Other columns go as they are."""
    for index, name in enumerate(data.column_names):
        ch_type = target_types.get(name)
        if ch_type is not None:
            column = data.column(index)
            converted = _converted(column, unwrap(ch_type)[0])
            if converted is not column:
                data = data.set_column(index, pa.field(name, converted.type), converted)
    return data


def _converted(column: pa.ChunkedArray, inner: str) -> pa.ChunkedArray:
    kind = column.type
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and inner.startswith("Array("):
        return _converted_list(column, inner)
    target = _arrow_for(inner)
    if target is None or (pa.types.is_timestamp(target) and _zone(inner)):  # a wall clock in the column's zone
        return column
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _converted_text(column, inner, target)
    if pa.types.is_date32(kind) and pa.types.is_timestamp(target):
        return pc.cast(column, target)
    return column


def _converted_list(column: pa.ChunkedArray, inner: str) -> pa.ChunkedArray:
    """An array column's elements converted (a transform's large lists, with 64-bit offsets, as lists)."""
    if pa.types.is_large_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    elements = pa.chunked_array([chunk.flatten() for chunk in column.chunks], column.type.value_type)
    converted = _converted(elements, unwrap(inner[len("Array("):-1])[0])
    if converted is elements:
        return column
    chunks, at = [], 0
    for chunk in column.chunks:  # each chunk's elements, rebuilt on its own offsets
        offsets = pc.subtract(chunk.offsets, chunk.offsets[0])
        count = len(chunk.flatten())
        values = converted.slice(at, count).combine_chunks()
        at += count
        chunks.append(pa.ListArray.from_arrays(offsets, values, mask=pc.is_null(chunk)))
    return pa.chunked_array(chunks, pa.list_(converted.type))


def _converted_text(column: pa.ChunkedArray, inner: str, target: pa.DataType) -> pa.ChunkedArray:
    """Text `first_misfit` passed, read into `target` the way it was checked."""
    if pa.types.is_date32(target) or pa.types.is_timestamp(target):  # as `_read_times` read them
        times = _read_times(column)
        if times is None:
            raise ValueError(f"{inner}: times that passed the check do not read")
        return pc.cast(times, target) if pa.types.is_date32(target) else times
    unsigned = pc.replace_substring_regex(column, "^[+]", "")  # Arrow reads no sign but -
    try:
        return pc.cast(unsigned, target)
    except pa.ArrowInvalid:  # digits Arrow will not rescale (1.000…0 into a scale of 2): Python's Decimal
        if not pa.types.is_decimal(target):
            raise
        quantum = Decimal(1).scaleb(-target.scale)
        return pa.chunked_array([pa.array([None if t is None else Decimal(t).quantize(quantum, context=_WIDE)
                                           for t in unsigned.to_pylist()], target)])


def _arrow_for(inner: str) -> pa.DataType | None:
    """The Arrow type text is read into for a ClickHouse type (None: text goes as it is)."""
    if inner in ("Float32", "Float64"):
        return pa.float32() if inner == "Float32" else pa.float64()
    match = _INT.match(inner)
    if match and int(match[2]) <= 64:
        return getattr(pa, f"{'u' if match[1] else ''}int{match[2]}")()
    match = _DECIMAL.match(inner)
    if match:
        precision, scale = int(match[1]), int(match[2])
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if inner in ("Date", "Date32"):
        return pa.date32()
    digits = _DATETIME64.match(inner)
    if digits:
        return pa.timestamp("ns" if int(digits[1]) > 6 else "us")
    if inner == "DateTime" or inner.startswith("DateTime("):
        return pa.timestamp("us")
    return None


def refused(columns: Sequence[tuple[str, str, pa.DataType]], target_types: dict[str, str]) -> list[str]:
    """The source columns (name, PostgreSQL type, Arrow type) whose target column is of a type this service
    cannot check their values for, each with what to do; arrays compared by their elements."""
    found = []
    for name, pg_type, kind in columns:
        ch_type = target_types.get(name)
        if ch_type is None:
            continue
        inner = unwrap(ch_type)[0]
        if pa.types.is_list(kind) and inner.startswith("Array("):
            # an array column is read as deep as its target nests (run.chunk): values of another depth
            # are bad rows; what counts here is the element types
            while pa.types.is_list(kind):
                kind = kind.value_type
            while inner.startswith("Array("):
                inner = unwrap(inner[len("Array("):-1])[0]
        why = unchecked(kind, inner)
        if why:
            found.append(f"column {name} ({pg_type}) into {ch_type}: {why} — change the target column's type, cast"
                         " the column in a view the job reads, or convert it in ETL_TRANSFORM")
    return found


def _first(column: pa.ChunkedArray, bad: pa.ChunkedArray) -> object:
    """The first value of `column` where `bad` is true (as Arrow writes it where Python has no such value)."""
    at = pc.index(bad, True).as_py()
    try:
        return column[at].as_py()
    except (OverflowError, ValueError):  # a date or time before year 1 or after 9999
        return pc.cast(column.slice(at, 1), pa.string())[0].as_py()


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
    if pa.types.is_decimal(column.type) and inner in _EXACT_INT:
        return _decimal_float_misfit(column, inner)
    if not pa.types.is_decimal(column.type):
        exact = _EXACT_INT.get(inner)
        if exact is None:
            return None
        stats = pc.min_max(column)
        if max(abs(stats["min"].as_py()), abs(stats["max"].as_py())) <= exact:
            return None
        back = pc.cast(pc.cast(column, pa.float32() if inner == "Float32" else pa.float64(), safe=False),
                       column.type, safe=False)  # a float past the type's end wraps: never equal
        bad = pc.not_equal(back, column)
        return f"value {_first(column, bad)} is not held exactly by {inner}" if pc.any(bad).as_py() else None
    match = _DECIMAL.match(inner)
    scale = int(match[2]) if match else 0 if _INT.match(inner) else None
    if scale is None or column.type.scale <= scale:
        return None
    bad = pc.not_equal(pc.round(column, ndigits=scale), column)
    if pc.any(bad).as_py():
        return f"value {_first(column, bad)} has more digits after the point than {inner} keeps ({scale})"
    return None


def _decimal_float_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    """A decimal into Float32 / Float64: it fits if the float, written with the decimal's digits, is the decimal."""
    as_float = pc.cast(column, pa.float64())
    if inner == "Float32":
        as_float = pc.cast(pc.cast(as_float, pa.float32(), safe=False), pa.float64())
        bad = pc.invert(pc.is_finite(as_float))
        if pc.any(bad).as_py():
            return f"value {_first(column, bad)} does not fit Float32 (it would be stored as inf)"
    back = pc.cast(as_float, column.type, safe=False)
    bad = pc.not_equal(back, column)
    if pc.any(bad).as_py():
        return f"value {_first(column, bad)} is not held exactly by {inner}"
    return None


def _time_misfit(column: pa.ChunkedArray, inner: str, ranges: Ranges,
                 shown: pa.ChunkedArray | None = None) -> str | None:
    """Dates and times out of the target type's range, or finer than it keeps (`shown`: the text they were
    read from, to name a value by)."""
    zone = _zone(inner)
    # text or a date for a column in another zone than UTC: ClickHouse reads it as that zone's wall clock
    wall_clock = zone is not None and (shown is not None or pa.types.is_date32(column.type))
    shown = column if shown is None else shown
    if wall_clock:
        problem = _wall_clock_misfit(column, inner, str(zone))
        if problem:
            return problem
    if pa.types.is_date32(column.type):
        ticks, per_second = pc.multiply(pc.cast(pc.cast(column, pa.int32()), pa.int64()), _DAY_SECONDS), 1
    else:
        ticks, per_second = pc.cast(column, pa.int64()), _PER_SECOND[column.type.unit]
    bounds = _time_bounds(inner, ranges, per_second)
    if bounds is None:
        return None
    (low, high), keep = bounds
    if wall_clock:  # up to a day from UTC: kept off the range's ends
        low, high = low + _DAY_SECONDS, high - _DAY_SECONDS
    out = pc.or_(pc.less(ticks, max(low * per_second, _INT64[0])),
                 pc.greater(ticks, min((high + 1) * per_second - 1, _INT64[1])))
    if pc.any(out).as_py():
        return f"value {_first(shown, out)} is out of the range of {inner}"
    if keep > 1:
        finer = pc.not_equal(pc.subtract(ticks, pc.multiply(pc.divide(ticks, keep), keep)), 0)
        if pc.any(finer).as_py():
            return f"value {_first(shown, finer)} is more precise than {inner} keeps"
    return None


def _float_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    kind = column.type
    if inner == "Float32":
        finite = pc.is_finite(column)
        size = pc.abs(column)
        # beyond the largest, or below the smallest normal Float32 (kept with fewer digits, or as 0)
        if pa.types.is_float32(kind):  # a real already: Float32 holds the same bits, subnormals too
            return None
        bad = pc.and_(finite, pc.or_(pc.greater(size, _FLOAT32_MAX), pc.and_(pc.greater(size, 0),
                                                                              pc.less(size, 1.1754943508222875e-38))))
        if pc.any(bad).as_py():
            return f"value {_first(column, bad)} does not fit Float32 (it would be stored as inf, or rounded to 0)"
        # a double that Float32 would round (16777217, 0.1): the float it would become is another number
        narrowed = pc.cast(pc.cast(column, pa.float32(), safe=False), pa.float64())
        bad = pc.and_(finite, pc.not_equal(narrowed, pc.cast(column, pa.float64())))
        if pc.any(bad).as_py():
            return f"value {_first(column, bad)} is not held exactly by Float32"
        return None
    bounds = _bounds(inner)
    if bounds is None:
        return None
    bad = pc.invert(pc.is_finite(column))
    if pc.any(bad).as_py():
        return f"value {_first(column, bad)} is not held exactly by {inner}"
    # the integer bounds as floats round up (float(2**63 - 1) is 2**63): below high + 1, compared exactly
    low, above = float(bounds[0]), float(bounds[1] + (1 if isinstance(bounds[1], int) else 0))
    bad = pc.or_(pc.less(column, low), pc.greater_equal(column, above) if isinstance(bounds[1], int)
                 else pc.greater(column, above))
    if pc.any(bad).as_py():
        return f"value {_first(column, bad)} does not fit {inner}"
    match = _DECIMAL.match(inner)
    if match:  # the float, written with the Decimal's digits, is the same float again, and ClickHouse
        # (which truncates the float times 10^scale) writes those digits
        scale = int(match[2])
        wide = pc.cast(column, pa.float64())
        written = pc.cast(pc.cast(wide, pa.decimal256(76, scale), safe=False), column.type)
        scaled = pc.multiply(wide, float(10 ** scale))
        bad = pc.or_(pc.not_equal(written, column), pc.not_equal(pc.trunc(scaled), pc.round(scaled)))
        # past 2^53 ClickHouse's conversion makes digits up (1e30 into Decimal(38, 0))
        bad = pc.or_(bad, pc.greater_equal(pc.abs(scaled), float(2**53)))
    else:
        bad = pc.not_equal(pc.floor(column), column)
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


# Text into a typed column (an operator-made target, a transform's output, PostgreSQL's text of a type
# ClickHouse has none for): ClickHouse parses it on insert, and what it cannot parse becomes NULL in a
# Nullable column, a Decimal keeps the digits its scale has, a date past the type's range is clamped.
# So the text is read here first, by rules no looser than ClickHouse's, and the value it is checked
# like any other; text these rules cannot read is a bad row, named, never a NULL.
_INTEGER_TEXT = re.compile(r"^[+-]?[0-9]+$")
_UNSIGNED_TEXT = re.compile(r"^[+]?[0-9]+$")  # ClickHouse reads no sign but + into an unsigned type
_DECIMAL_TEXT = re.compile(r"^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$")
_FLOAT_WORDS = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
_UUID_TEXT = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# Dates and times as ClickHouse's insert reads them: no 'T', no zone or offset (it stores NULL for those).
_TIME_TEXT = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]{1,9})?)?$"
_IPV4_TEXT = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"
_WIDE = Context(prec=2_000, Emax=10**7, Emin=-(10**7))  # every digit of any double, or of any 76-digit Decimal
_BOOL_WORDS = ["true", "false", "1", "0", "yes", "no", "on", "off", "y", "n", "t", "f", "enable", "disable"]


def _text_misfit(column: pa.ChunkedArray, inner: str, ranges: Ranges) -> str | None:
    """Text into a column of another type (`unchecked` let it through): the first text that would not
    arrive as the value it writes."""
    if inner == "String" or _FIXED.match(inner):
        return None
    values = pc.drop_null(column)
    if not len(values):
        return None
    if _INT.match(inner) or _DECIMAL.match(inner) or inner in ("Bool", "Date", "DateTime") or \
            inner.startswith(("DateTime(", "DateTime64", "Date32", "Float")):
        return _parsed_misfit(values, inner, ranges)
    if inner == "UUID":
        return _pattern_misfit(values, _UUID_TEXT, "is not a UUID")
    if inner == "IPv4":
        return _pattern_misfit(values, _IPV4_TEXT, "is not an IPv4 address")
    if inner.startswith("Enum"):
        names = [name for name, _ in enum_values(inner)]
        bad = pc.invert(pc.is_in(values, value_set=pa.array(names, pa.string())))
        return f"value {_cut(_first(values, bad))} is not a value of {inner}" if pc.any(bad).as_py() else None
    if inner == "IPv6":
        return _ipv6_misfit(values)
    return f"text into {inner}: this service cannot tell whether ClickHouse reads the text as the value it writes"


def _ipv6_misfit(values: pa.ChunkedArray) -> str | None:
    for text in pc.unique(values).to_pylist():
        try:
            if "%" in text:  # a scope, which Python reads and ClickHouse does not
                raise ValueError(text)
            ipaddress.ip_address(text)
        except ValueError:
            return f"value {_cut(text)} is not an IP address"
    return None


def _cut(text: object) -> str:
    return repr(text[:40] + "…" if isinstance(text, str) and len(text) > 40 else text)


def _pattern_misfit(values: pa.ChunkedArray, pattern: str, why: str) -> str | None:
    bad = pc.invert(pc.match_substring_regex(values, pattern))
    return f"value {_cut(_first(values, bad))} {why}" if pc.any(bad).as_py() else None


def _parsed_misfit(values: pa.ChunkedArray, inner: str, ranges: Ranges) -> str | None:
    """Numbers, booleans, dates and times written as text: read them, then check the values."""
    if inner == "Bool":
        bad = pc.invert(pc.is_in(pc.utf8_lower(values), value_set=pa.array(_BOOL_WORDS)))
        return f"value {_cut(_first(values, bad))} is not a boolean" if pc.any(bad).as_py() else None
    if inner.startswith("Float"):
        return _float_text_misfit(values, inner)
    if inner.startswith(("Date", "DateTime")):
        return _time_text_misfit(values, inner, ranges)
    pattern = (_UNSIGNED_TEXT if inner.startswith("U") else _INTEGER_TEXT) if _INT.match(inner) else _DECIMAL_TEXT
    bad = pc.invert(pc.match_substring_regex(values, pattern.pattern))
    if pc.any(bad).as_py():
        return f"value {_cut(_first(values, bad))} is not a number {inner} reads"
    return _exact_number_misfit(values, inner)


def _exact_number_misfit(values: pa.ChunkedArray, inner: str) -> str | None:
    """Number text into an integer or Decimal type: every digit kept, within range. Arrow reads short text
    (it wraps numbers of more digits than its decimal holds, silently); long text and exponents are read
    by Python's Decimal, value by value."""
    match = _DECIMAL.match(inner)
    scale = int(match[2]) if match else 0
    long = pc.or_(pc.greater(pc.utf8_length(values), 36),
                  pc.match_substring_regex(values, "[eE]"))
    bounds = _bounds(inner)
    for text in pc.unique(pc.filter(values, long)).to_pylist():
        number = Decimal(text)
        try:
            kept = number.quantize(Decimal(1).scaleb(-scale), context=_WIDE)
        except InvalidOperation:  # thousands of digits
            return f"value {_cut(text)} does not fit {inner}"
        if kept != number:
            return f"value {_cut(text)} has more digits after the point than {inner} keeps ({scale})"
        if bounds is None or not bounds[0] <= number <= bounds[1]:
            return f"value {_cut(text)} does not fit {inner}"
    short = pc.filter(values, pc.invert(long))
    if not len(short):
        return None
    kind = pa.decimal128(38, scale) if scale <= 38 else pa.decimal256(76, scale)
    try:
        numbers = pc.cast(short, kind)
    except pa.ArrowInvalid:  # more digits after the point than the scale, or in all than 38
        for text in short.to_pylist():
            if not _reads(text, kind):
                number = Decimal(text)
                if number != number.quantize(Decimal(1).scaleb(-scale), context=_WIDE):
                    return f"value {_cut(text)} has more digits after the point than {inner} keeps ({scale})"
                return f"value {_cut(text)} does not fit {inner}"
        raise
    return _range_misfit(numbers, inner)


def _time_text_misfit(values: pa.ChunkedArray, inner: str, ranges: Ranges) -> str | None:
    bad = pc.invert(pc.match_substring_regex(values, _TIME_TEXT))
    if pc.any(bad).as_py():
        return f"value {_cut(_first(values, bad))} is not a date or time written as YYYY-MM-DD[ hh:mm:ss[.fff]]"
    parsed = _read_times(values)
    if parsed is None:  # a day or hour that does not exist (2024-02-30, 25:00:00), or 7-9 digits beyond 1677..2262
        for text in values.to_pylist():
            if not any(_reads(text, pa.timestamp(unit)) for unit in ("us", "ns")):
                return f"value {_cut(text)} is not a date or time {inner} holds"
        return (f"values of {inner} mix 7 to 9 digits of a second with years beyond 1677..2262, which this"
                " service cannot read together")
    return _time_misfit(parsed, inner, ranges, values)


def _read_times(values: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Date and time text as timestamps: to the microsecond (years 1..9999), else to the nanosecond (more
    digits of a second, years 1677..2262); None if neither reads every value."""
    for unit in ("us", "ns"):
        with suppress(pa.ArrowInvalid):
            return pc.cast(values, pa.timestamp(unit))
    return None


def _time_bounds(inner: str, ranges: Ranges, per_second: int) -> tuple[tuple[int, int], int] | None:
    """((first, last second) a date or time type holds, the ticks of `per_second` it keeps as one)."""
    digits = _DATETIME64.match(inner)
    if digits:  # the server's range, and what its 64-bit count of 10^-p seconds reaches (1677..2262 at 9)
        (low, high), keep = ranges.datetime64_seconds, max(1, per_second // 10 ** int(digits[1]))
        reach = (2**63 - 1) // 10 ** int(digits[1])
        return (max(low, -reach), min(high, reach - 1)), keep
    if inner.startswith("DateTime"):
        return _DATETIME_SECONDS, per_second
    if inner in ("Date", "Date32"):
        first, last = _DATE_DAYS if inner == "Date" else ranges.date32_days
        return (first * _DAY_SECONDS, (last + 1) * _DAY_SECONDS - 1), _DAY_SECONDS * per_second
    return None


def _zone(inner: str) -> str | None:
    """The zone a DateTime / DateTime64 column names, unless UTC (None: UTC, or the server's)."""
    found = re.search(r"'([^']*)'\)$", inner) if inner.startswith("DateTime") else None
    return found[1] if found and found[1] not in ("UTC", "Etc/UTC", "GMT") else None


def _wall_clock_misfit(column: pa.ChunkedArray, inner: str, zone: str) -> str | None:
    """A wall-clock time in `zone` that does not exist there (a DST gap: ClickHouse moves it by an hour) or
    exists twice (the hour repeated when clocks go back: which of the two is meant is not written)."""
    try:
        place = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"{inner}: this service does not know the zone {zone!r}, so cannot check wall-clock times in it"
    values = pc.cast(column, pa.timestamp("us"), safe=False)  # dates, and ns (Python's datetime has microseconds)
    for naive in pc.unique(values).to_pylist():
        if naive is None:
            continue
        if naive.year in (1, 9999):  # a zone's offset there runs off the calendar: the range check names it
            continue
        early, late = naive.replace(tzinfo=place, fold=0), naive.replace(tzinfo=place, fold=1)
        if early.astimezone(UTC).astimezone(place).replace(tzinfo=None) != naive:
            return f"value {naive} does not exist in {zone} (the hour the clocks skip): {inner} would move it"
        if early.utcoffset() != late.utcoffset():
            return (f"value {naive} happens twice in {zone} (the hour the clocks go back): {inner} would"
                    " keep one of the two")
    return None


def _reads(text: str, kind: pa.DataType) -> bool:
    try:
        pc.cast(pa.array([text]), kind)
    except pa.ArrowInvalid:
        return False
    return True


def _float_text_misfit(values: pa.ChunkedArray, inner: str) -> str | None:
    """A number written as text fits a float if the float, written with the text's digits, is that number.
    Read by Arrow (correctly rounded; `prepared` then sends the float, as ClickHouse's own reading of float
    text on insert is not always the nearest float). Text of at most 15 significant digits (6 for
    Float32) always fits; longer text is compared digit by digit."""
    narrow = inner == "Float32"
    try:
        parsed = pc.cast(values, pa.float32() if narrow else pa.float64())
    except pa.ArrowInvalid:
        for text in values.to_pylist():
            if not _reads(text, pa.float32() if narrow else pa.float64()):
                return f"value {_cut(text)} is not a number {inner} reads"
        raise
    words = pc.is_in(pc.utf8_lower(values), value_set=pa.array(sorted(_FLOAT_WORDS)))
    bad = pc.and_(pc.invert(pc.is_finite(parsed)), pc.invert(words))
    if pc.any(bad).as_py():
        return f"value {_cut(_first(values, bad))} does not fit {inner} (it would be stored as inf)"
    digits = pc.utf8_length(pc.replace_substring_regex(values, r"^[+-]?[0.]*|[eE].*$|[.]", ""))
    # more digits than the float keeps, or a number below its smallest normal (rounded to fewer digits, or 0)
    tiny = pc.less(pc.abs(parsed), 1.1754943508222875e-38 if narrow else 2.2250738585072014e-308)
    long = pc.and_(pc.or_(pc.greater(digits, 6 if narrow else 15), tiny), pc.invert(words))
    for text in pc.unique(pc.filter(values, long)).to_pylist():
        number = Decimal(text)
        as_float = float(np.float32(float(number))) if narrow else float(number)
        try:
            written = Decimal(as_float).quantize(Decimal(1).scaleb(int(number.as_tuple().exponent)), context=_WIDE)
        except InvalidOperation:  # more digits than any float has
            return f"value {_cut(text)} is not held exactly by {inner}"
        if written != number:
            return f"value {_cut(text)} is not held exactly by {inner}"
    return None


_ENUM_PAIR = re.compile(r"'((?:[^'\\]|\\.)*)'\s*=\s*(-?\d+)")


def enum_values(inner: str) -> list[tuple[str, int]]:
    """An Enum type's (name, number) pairs, names unescaped."""
    return [(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), name), int(number))
            for name, number in _ENUM_PAIR.findall(inner)]


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "0": "\0", "b": "\b", "f": "\f"}


def _enum_misfit(column: pa.ChunkedArray, inner: str) -> str | None:
    """A number into an Enum must be one of its values (ClickHouse stores any, then cannot show it)."""
    values = [number for _, number in enum_values(inner)]
    if not values:
        return None
    wide = pc.cast(column, pa.int64(), safe=False) if column.type != pa.uint64() else column
    bad = pc.and_(pc.is_valid(column), pc.invert(pc.is_in(wide, value_set=pa.array(values, wide.type))))
    if pc.any(bad).as_py():
        return f"value {_first(column, bad)} is not a value of {inner}"
    return None


# Numbers ClickHouse takes as a Bool, seconds (DateTime) or days (Date) and would otherwise clamp.
_NUMBER_AS = {"Bool": (0, 1), "Date": (0, 65_535)}


def _bounds(ch_type: str) -> tuple[int | Decimal, int | Decimal] | None:
    if ch_type in _NUMBER_AS:
        return _NUMBER_AS[ch_type]
    if ch_type == "DateTime" or ch_type.startswith("DateTime("):
        return _DATETIME_SECONDS
    match = _INT.match(ch_type)
    if match:
        bits = int(match[2])
        if match[1]:
            return 0, 2**bits - 1
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    match = _DECIMAL.match(ch_type)
    if match:
        precision, scale = int(match[1]), int(match[2])
        limit = _WIDE.subtract(Decimal(10 ** (precision - scale)), Decimal(1).scaleb(-scale))
        return -limit, limit
    return None
