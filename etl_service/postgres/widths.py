"""How many bytes a source row takes on its way out: what bounds a chunk by bytes.
"""

from __future__ import annotations

import pyarrow as pa
from psycopg2 import sql

from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.typemap import Column

# Types whose raw length octet_length() reads from the value's header, without fetching or
# decompressing a TOASTed value (bytea's length is doubled: COPY writes it in hex).
_RAW_LENGTH = {"text": 1, "bytea": 2, "json": 1, "xml": 1}
_RAW_LENGTH_PREFIX = ("character varying", "character(", "character")


def row_bytes(shape: SourceShape, alias: str = "s") -> sql.Composable:
    """About how many bytes a row takes on its way out (COPY text, then Arrow).

    Fixed-width types (integers, floats, dates, timestamps, uuid, boolean) count their width, a
    constant. Texts and byteas count their full length, read from the value's header without
    fetching it (what makes a row large: a value of several MB). Other types count their stored size,
    unless PostgreSQL compressed the value: a compressed jsonb or array can be a hundred times
    its stored size, so such a value (2 kB or more before compression) is measured as text.
    Used at claim time to end chunks by bytes as well as by rows (PostgreSQL 14 or later).
    """
    parts: list[sql.Composable] = []
    fixed = len(shape.columns)  # separators
    for column in shape.columns:
        ident = sql.Identifier(alias, column.name)
        width = _fixed_width(column)
        if width:  # a constant: nothing to compute per row (a NULL counts its width too)
            fixed += width
            continue
        text = column.pg_type.startswith(_RAW_LENGTH_PREFIX) and not column.pg_type.endswith("]")  # not arrays
        factor = _RAW_LENGTH.get(column.pg_type) or (1 if text else 0)
        if factor:
            cast = sql.SQL("::text") if column.pg_type in ("json", "xml") else sql.SQL("")
            parts.append(sql.SQL("coalesce(octet_length({}{}), 0) * {}").format(ident, cast, sql.Literal(factor)))
        else:
            parts.append(sql.SQL("coalesce(CASE WHEN pg_column_compression({0}) IS NULL THEN pg_column_size({0})"
                                 " ELSE octet_length({0}::text) END, 0)").format(ident))
    parts.append(sql.Literal(fixed))
    return sql.SQL(" + ").join(parts)


def _fixed_width(column: Column) -> int | None:
    """Bytes of a fixed-width column in Arrow (bool: 1), or None when its values vary in size."""
    if column.pg_type == "uuid":
        return 16
    if pa.types.is_boolean(column.arrow_type):
        return 1
    if pa.types.is_decimal(column.arrow_type):  # numeric's stored size follows its digits
        return None
    try:
        return int(column.arrow_type.byte_width) or None
    except ValueError:  # strings, lists, binaries
        return None
