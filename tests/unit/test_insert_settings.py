"""The insert settings the guarantee rests on: sent where the server knows them, refused where a
profile forbids them. What a ClickHouse server (not the embedded engine) answers, as data."""

from __future__ import annotations

from typing import Any

import pytest

from etl_service.clickhouse.inserts import INSERT_SETTINGS, check_insert_settings, insert_settings
from etl_service.errors import ConfigError


class Server:
    """A client whose server knows `known` settings and answers system.settings with `rows`."""

    def __init__(self, known: list[str], rows: list[tuple[str, str, int]]) -> None:
        self.server_settings = {name: object() for name in known}
        self.rows = rows

    def query(self, _query: str, parameters: dict[str, Any] | None = None) -> Any:
        return type("Result", (), {"result_rows": self.rows})()


def test_an_older_server_is_sent_only_the_settings_it_knows() -> None:
    old = Server(["insert_deduplicate", "deduplicate_blocks_in_dependent_materialized_views", "async_insert"], [])
    assert insert_settings(old) == {"insert_deduplicate": "1", "async_insert": "0",
                                    "deduplicate_blocks_in_dependent_materialized_views": "1"}
    assert insert_settings(Server(list(INSERT_SETTINGS), [])) == INSERT_SETTINGS


@pytest.mark.parametrize(("name", "value"), [("deduplicate_insert", "disable"), ("insert_deduplicate", "0"),
                                             ("async_insert", "1")])
def test_a_setting_the_user_may_not_change_is_a_configuration_error(name: str, value: str) -> None:
    server = Server(list(INSERT_SETTINGS), [(name, value, 1), ("readonly", "0", 0)])
    with pytest.raises(ConfigError) as err:
        check_insert_settings(server)
    assert err.value.variable == "CLICK_USER" and f"sets {name} = {value} and may not change it" in str(err.value)


def test_a_readonly_profile_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="readonly = 1"):
        check_insert_settings(Server(list(INSERT_SETTINGS), [("readonly", "1", 1)]))


def test_a_profile_the_insert_overrides_is_a_note() -> None:
    server = Server(list(INSERT_SETTINGS), [("deduplicate_insert", "disable", 0), ("async_insert", "1", 0),
                                            ("insert_deduplicate", "1", 1), ("readonly", "0", 0)])
    assert check_insert_settings(server) == ["deduplicate_insert = disable on the server; every insert sends enable",
                                             "async_insert = 1 on the server; every insert sends 0"]
