"""Do a chunk's values fit the target's ClickHouse types? Pure checks on Arrow data, no I/O.

ClickHouse converts some values on insert without complaint where the result is not the value
sent: integers wrap (1000 into Int8 becomes -24), decimals wider than Decimal(P, S) are stored
anyway, NULL into a non-Nullable column becomes the type's default. These checks catch exactly
those cases before the insert; values ClickHouse rejects itself (unparsable UUID, a date out of
range) come back as errors and are handled the same way.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc

_INT = re.compile(r"^(U?)Int(8|16|32|64|128|256)$")
_DECIMAL = re.compile(r"^Decimal(?:32|64|128|256)?\((\d+),\s*(\d+)\)$")


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
    if pa.types.is_integer(column.type) or pa.types.is_decimal(column.type):
        return _range_misfit(column, inner)
    return None


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
