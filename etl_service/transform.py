"""Transform: pure DataFrame -> DataFrame, no I/O.

Column selection and renaming happen at extraction (ETL_COLUMNS). The optional user function
named `module:function` receives each chunk as a pandas DataFrame backed by Arrow types
(exact decimals, UTC timestamps, nullable ints) and returns a DataFrame. Without a user
function chunks stay in Arrow and never pay for a pandas round trip.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import pandas as pd
import pyarrow as pa

from etl_service.errors import ConfigError, TransformError

UserFunction = Callable[[pd.DataFrame], pd.DataFrame]


@functools.cache
def load_user_function(spec: str, variable: str = "ETL_TRANSFORM") -> UserFunction:
    """Import `module:function`; ConfigError naming `variable` if it cannot be used."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(variable, f"{spec!r} is not of the form module:function",
                          "e.g. my_transforms:clean_orders (the module must be importable)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(variable, f"cannot import module {module_name!r}: {exc}",
                          "put it on PYTHONPATH or next to run_etl.sh") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(variable, f"module {module_name!r} has no function {func_name!r}")
    return func


def apply(table: pa.Table, spec: str) -> pa.Table:
    """Run the user function (if any) on one chunk and return Arrow again."""
    if not spec:
        return table
    func = load_user_function(spec)
    frame = table.to_pandas(types_mapper=pd.ArrowDtype)
    try:
        result = func(frame)
    except Exception as exc:
        raise TransformError(f"transform {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, pd.DataFrame):
        raise TransformError(f"transform {spec} returned {type(result).__name__}, expected a DataFrame")
    try:
        return pa.Table.from_pandas(result, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise TransformError(f"transform {spec} returned columns Arrow cannot hold: {exc}") from exc
