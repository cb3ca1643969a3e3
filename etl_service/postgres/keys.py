"""The source key: which columns make a row unique, and how a key is written down and matched.

A key has one column or several (`ETL_SOURCE_KEY=tenant_id, id`). The ledger and the
quarantine hold keys as text: a one-column key as PostgreSQL's own text of the value (`42`),
a composite key as a JSON array of the values (`[7, 42]`), in the column order of the unique
index that backs the key. Matching a stored key back to a row casts each part to its column
type, so the comparison is on typed values and uses the index.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg2 import sql


@dataclass(frozen=True)
class KeyColumn:
    """One column of the key."""

    name: str
    pg_type: str  # format_type() from the catalog, e.g. bigint or timestamp with time zone
    nullable: bool


@dataclass(frozen=True)
class Key:
    """The key of a source table, in the order of the index that makes it unique."""

    columns: tuple[KeyColumn, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def label(self) -> str:
        """`id`, or `(tenant_id, id)`: how log lines and status name the key."""
        return self.columns[0].name if len(self.columns) == 1 else f"({', '.join(self.names)})"

    def ordered(self, names: tuple[str, ...]) -> Key:
        """The same key with its columns in the order `names` gives (a set of the same columns)."""
        by_name = {c.name: c for c in self.columns}
        return Key(tuple(by_name[n] for n in names))

    @property
    def integer(self) -> bool:
        """One column of an integer type: its claimed keys' span tells how dense a key range is."""
        return len(self.columns) == 1 and self.columns[0].pg_type in ("smallint", "integer", "bigint")

    def _type(self, i: int) -> sql.Composable:
        # format_type() output from the catalog, not user text: safe to splice as a type name.
        return sql.SQL(self.columns[i].pg_type)

    def encode(self, alias: str) -> sql.Composable:
        """The stored text of the key of row `alias`."""
        if len(self.columns) == 1:
            return sql.SQL("{}::text").format(sql.Identifier(alias, self.columns[0].name))
        parts = sql.SQL(", ").join(sql.Identifier(alias, c.name) for c in self.columns)
        return sql.SQL("jsonb_build_array({})::text").format(parts)

    def decode(self, text: sql.Composable) -> list[sql.Composable]:
        """Typed values of each key column from a stored key (a text expression)."""
        if len(self.columns) == 1:
            return [sql.SQL("({})::{}").format(text, self._type(0))]
        return [sql.SQL("(({})::jsonb->>{})::{}").format(text, sql.Literal(i), self._type(i))
                for i in range(len(self.columns))]

    def canonical(self, text: sql.Composable) -> sql.Composable:
        """A key as an operator typed it, rewritten the way the ledger stores it (or a cast error)."""
        if len(self.columns) == 1:
            return sql.SQL("{}::text").format(self.decode(text)[0])
        return sql.SQL("jsonb_build_array({})::text").format(sql.SQL(", ").join(self.decode(text)))

    def row(self, alias: str) -> sql.Composable:
        """The key columns of row `alias`, for ORDER BY and row comparisons."""
        return sql.SQL(", ").join(sql.Identifier(alias, c.name) for c in self.columns)

    def matches(self, alias: str, text: sql.Composable) -> sql.Composable:
        """Row `alias` has the stored key `text` (an index-usable equality per column)."""
        return sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(alias, c.name), value)
            for c, value in zip(self.columns, self.decode(text), strict=True))

    def compare(self, alias: str, op: str, text: sql.Composable) -> sql.Composable:
        """Row comparison of `alias`'s key with a stored key: `(a, b) > (x, y)` (index order)."""
        return sql.SQL("({}) {} ({})").format(self.row(alias), sql.SQL(op), sql.SQL(", ").join(self.decode(text)))

    def not_null(self, alias: str) -> sql.Composable:
        """Rows whose key has no NULL part (only nullable columns are tested); TRUE if none can be NULL."""
        tests = [sql.SQL("{} IS NOT NULL").format(sql.Identifier(alias, c.name)) for c in self.columns
                 if c.nullable]
        return sql.SQL(" AND ").join(tests) if tests else sql.SQL("TRUE")

    def has_null(self, alias: str) -> sql.Composable:
        """Rows whose key has a NULL part: they cannot be moved (see docs/postgresql.md, "The source table")."""
        tests = [sql.SQL("{} IS NULL").format(sql.Identifier(alias, c.name)) for c in self.columns if c.nullable]
        return sql.SQL(" OR ").join(tests) if tests else sql.SQL("FALSE")
