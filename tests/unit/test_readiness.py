"""Readiness answers are typed: a boolean or a number is yes/no; anything else is a configuration error."""

from __future__ import annotations

from decimal import Decimal

import pytest

from etl_service.clickhouse.readiness import readiness
from etl_service.errors import ConfigError


@pytest.mark.parametrize(("answer", "ready"), [
    (True, True), (False, False), (1, True), (0, False), (-1, True), (2**64 - 1, True),
    (0.5, True), (0.0, False), (Decimal("0.00"), False), (Decimal("0.01"), True), (None, False),
])
def test_a_boolean_or_a_number_is_an_answer(answer: object, ready: bool) -> None:
    assert readiness(answer) is ready


@pytest.mark.parametrize("answer", ["pending", "", "1", "true", float("nan"), [1], (1,), b"1"])
def test_anything_else_is_a_configuration_error_naming_the_query(answer: object) -> None:
    with pytest.raises(ConfigError) as info:
        readiness(answer)
    assert info.value.variable == "ETL_READY_QUERY"
    assert "must answer true/false or a number" in str(info.value)
