"""Readiness: the job's query that says ClickHouse's downstream work is done, checked and polled.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from loguru import logger

from etl_service.clickhouse.clients import ch_errors
from etl_service.errors import ConfigError, SinkError

_ANSWER_TYPE = re.compile(r"^(Bool|U?Int\d+|Float\d+|Decimal(\d+)?\(.*\)|Nothing)$")


def check_ready_query(client: Client, query: str) -> None:
    """ConfigError if the readiness query's first column cannot be a yes or no (a String, an Array, …).

    Asked of the query's type (`DESCRIBE (query)`), so it is found even while the query has no row
    for the batch. A query DESCRIBE cannot wrap is run once as it is: one ClickHouse cannot parse
    (a FORMAT clause, a typo) is a ConfigError too; one that fails otherwise (a table not made yet)
    is left to the answers themselves (`readiness`).
    """
    params = {"batch_id": 0} if "{batch_id" in query else None
    try:
        with ch_errors("describe the readiness query"):
            # on lines of their own: a trailing `-- comment` must not swallow the parenthesis
            rows = client.query(f"DESCRIBE (\n{query.strip().rstrip(';')}\n)", parameters=params).result_rows
    except SinkError:
        try:
            with ch_errors("run the readiness query"):
                client.query(query, parameters=params)
        except SinkError as exc:
            if "Code: 62" in str(exc) or "SYNTAX_ERROR" in str(exc):
                raise ConfigError("ETL_READY_QUERY", f"ClickHouse cannot parse it: {exc}",
                                  "write one SELECT without a FORMAT clause, e.g. SELECT count() = 0 FROM … WHERE"
                                  " batch = {batch_id:UInt64} AND NOT done") from None
        return
    if not rows:
        return
    name, ch_type = str(rows[0][0]), str(rows[0][1])
    inner = ch_type
    while inner.startswith(("Nullable(", "LowCardinality(")):
        inner = inner.split("(", 1)[1][:-1]
    if not _ANSWER_TYPE.match(inner):
        raise ConfigError("ETL_READY_QUERY", f"answers {ch_type} ({name}): a readiness query must answer"
                          " true/false or a number (non-zero: ready)", "compare in the query, e.g."
                          " SELECT status = 'done' FROM … or SELECT count() = 0 FROM … WHERE NOT ready")


def is_ready(client: Client, query: str, batch_id: int, timeout: float) -> bool:
    """Run the readiness query once: is the first value of its first row a yes (see `readiness`)?"""
    params = {"batch_id": batch_id} if "{batch_id" in query else None
    with ch_errors("readiness query"):
        result = client.query(query, parameters=params, settings={"max_execution_time": int(timeout)})
    rows = result.result_rows
    return readiness(rows[0][0] if rows and rows[0] else None)


def readiness(answer: Any) -> bool:
    """A readiness answer as yes or no: a boolean, or a number (non-zero is yes); no row or NULL is no.

    Anything else (a string such as 'pending', an array, NaN) is a ConfigError naming
    ETL_READY_QUERY: taking it for a yes would mark rows before downstream work is done.
    """
    if answer is None or isinstance(answer, bool):
        return bool(answer)
    if isinstance(answer, int | Decimal) or (isinstance(answer, float) and not math.isnan(answer)):
        return answer != 0
    shown = "NaN" if isinstance(answer, float) else f"{type(answer).__name__} {str(answer)[:60]!r}"
    raise ConfigError("ETL_READY_QUERY", f"answered {shown}: a readiness query must answer true/false or a number"
                      " (non-zero: ready)", "compare in the query, e.g. SELECT status = 'done' FROM … or"
                      " SELECT count() = 0 FROM … WHERE NOT ready")


def await_ready(client: Client, query: str, batch_id: int, timeout: float, interval: float,
                stop: Callable[[float], bool], clock: Callable[[], float] = time.monotonic,
                first: float | None = None) -> bool:
    """Poll the readiness query until it says ready, the deadline passes, or a stop is asked.

    `stop(seconds)` waits up to `seconds` and returns True if the service is stopping. `first`:
    the first wait, doubled after each poll up to `interval` (a woken job: readiness a moment
    after the load should not cost a whole interval of latency).
    """
    deadline = clock() + timeout
    polls = 0
    wait = min(first, interval) if first else interval
    check_ready_query(client, query)
    while True:
        polls += 1
        if is_ready(client, query, batch_id, min(interval * 4, 60)):
            return True
        left = deadline - clock()
        if left <= 0:
            logger.warning("batch {} not ready after {:.0f}s ({} polls): it stays loaded, the next run"
                           " polls again without reloading", batch_id, timeout, polls)
            return False
        if stop(min(wait, left)):
            return False
        wait = min(wait * 2, interval)
