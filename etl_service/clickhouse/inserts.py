"""Deduplicated inserts: a chunk with its batch id and token, under settings that make the token count.
"""

from __future__ import annotations

import struct

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from etl_service.clickhouse.clients import ch_errors
from etl_service.clickhouse.target_table import BATCH_COLUMN, table_name
from etl_service.errors import ConfigError
from etl_service.postgres.versioning import VERSION_COLUMN


def _repeat_uint64(value: int, count: int) -> pa.Array:
    """`count` times `value` as UInt64, built from bytes: pa.array() and pa.scalar() import pandas
    (about 50 MB and 0.3 s) to see whether they were given pandas objects."""
    return pa.Array.from_buffers(pa.uint64(), count, [None, pa.py_buffer(struct.pack("<Q", value) * count)])


# The insert settings the guarantee rests on, sent with every insert whatever the server's profile
# says: deduplication on (`deduplicate_insert` supersedes `insert_deduplicate` since 26.x), also in
# the views on the target (or they would count a repeated block twice), and synchronous inserts
# (a chunk is large, and a token then means one insert, at once).
INSERT_SETTINGS = {"deduplicate_insert": "enable", "insert_deduplicate": "1",
                   "deduplicate_blocks_in_dependent_materialized_views": "1", "async_insert": "0"}


def insert_settings(client: Client) -> dict[str, str]:
    """INSERT_SETTINGS that this server knows: an older server refuses a setting it lacks."""
    known = getattr(client, "server_settings", None) or {}
    return {k: v for k, v in INSERT_SETTINGS.items() if k in known or (not known and k != "deduplicate_insert")}


def check_insert_settings(client: Client) -> list[str]:
    """ConfigError when the server would still keep a repeated insert twice; else what each setting is.

    A profile may set any of INSERT_SETTINGS; the value an insert sends wins, unless the user may
    not change it (a `readonly` profile, a constraint): then refused, naming the setting and the fix.
    """
    with ch_errors("read the effective insert settings"):
        rows = client.query("SELECT name, value, readonly FROM system.settings WHERE name IN {names:Array(String)}"
                            " OR name = 'readonly'", parameters={"names": list(INSERT_SETTINGS)}).result_rows
    found = {str(name): (str(value), bool(readonly)) for name, value, readonly in rows}
    if found.get("readonly", ("0", False))[0] == "1":
        raise ConfigError("CLICK_USER", "this user's profile is readonly = 1: it may not insert, nor change the"
                          " insert settings a retried insert needs", "use a user whose profile allows INSERT")
    notes = []
    for name, needed in insert_settings(client).items():
        value, fixed = found.get(name, (needed, False))
        if value != needed and fixed:
            raise ConfigError("CLICK_USER", f"this user's profile sets {name} = {value} and may not change it (a"
                              f" readonly setting or a constraint): a retried insert would be kept twice",
                              f"let the user change {name} (drop the constraint, or make it changeable), or set"
                              f" {name} = {needed} in its profile")
        if value != needed:
            notes.append(f"{name} = {value} on the server; every insert sends {needed}")
    return notes


def insert_chunk(client: Client, database: str, table: str, data: pa.Table, batch_id: int, token: str,
                 with_batch_column: bool, with_version_column: bool = True) -> int:
    """Insert one chunk; a repeat with the same token is dropped by ClickHouse. Returns rows sent.

    `data` may carry the rows' source versions (VERSION_COLUMN): sent where the target has the column.
    """
    if VERSION_COLUMN in data.column_names and not with_version_column:
        data = data.drop_columns([VERSION_COLUMN])
    if with_batch_column:
        data = data.append_column(BATCH_COLUMN, _repeat_uint64(batch_id, data.num_rows))
    settings = {"insert_deduplication_token": token, **insert_settings(client)}
    with ch_errors(f"insert batch {batch_id} into {database}.{table}"):
        client.insert_arrow(table_name(database, table), data, settings=settings)
    return data.num_rows
