"""Transform: pure DataFrame -> DataFrame, no I/O.

Column selection and renaming happen at extraction (ETL_COLUMNS). The optional user function
named `module:function` receives each chunk as a pandas DataFrame with nullable dtypes
(Int64, boolean, string; decimals stay exact as Arrow decimals; timestamptz is
datetime64[us, UTC]) and returns a DataFrame. It should treat rows independently: when it
raises, the chunk is split and it runs again on the halves, to find the rows it rejects. It
must be deterministic: a chunk sent again after a crash keeps its insert token, and the target
keeps the first copy. Without a user function chunks stay in Arrow and never pay for a pandas
round trip.

The contract on keys: every row the function returns carries the key columns, each row's key
is a key of the chunk it was given, and no key comes back twice. It may drop rows (a dropped
row counts as handled and is marked processed), never rename, re-key or duplicate them. A
chunk that breaks this fails the run before it is inserted (TransformContractError).
"""

from __future__ import annotations

import pyarrow as pa

from etl_service.errors import TransformContractError, TransformError
from etl_service.settings.declared import load_user_function


def _pandas_dtype(arrow_type: pa.DataType) -> object:
    """Familiar pandas dtypes that keep NULLs and exact values (None: pyarrow's default)."""
    import pandas as pd
    if pa.types.is_integer(arrow_type):
        return pd.api.types.pandas_dtype(str(arrow_type).replace("u", "U").replace("int", "Int"))
    if pa.types.is_floating(arrow_type):
        return pd.ArrowDtype(arrow_type)  # keeps NaN apart from NULL (pandas' Float64 folds NaN into NA)
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.StringDtype()
    if pa.types.is_decimal(arrow_type) or pa.types.is_list(arrow_type):
        return pd.ArrowDtype(arrow_type)  # exact: no float round trip, element types kept
    return None  # timestamps -> datetime64[us, UTC], dates and bytes -> Python objects


def apply(table: pa.Table, spec: str, keys: tuple[str, ...] = ()) -> pa.Table:
    """Run the user function (if any) on one chunk and return Arrow again, its keys checked."""
    if not spec:
        return table
    import pandas as pd  # about 50 MB and 0.3 s of start-up that a job without a function saves

    func = load_user_function(spec)
    frame = table.to_pandas(types_mapper=_pandas_dtype)
    try:
        result = func(frame)
    except Exception as exc:
        raise TransformError(f"transform {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, pd.DataFrame):
        raise TransformError(f"transform {spec} returned {type(result).__name__}, expected a DataFrame")
    try:
        out = pa.Table.from_pandas(result, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise TransformError(f"transform {spec} returned columns Arrow cannot hold: {exc}") from exc
    if keys:
        check_keys(table, out, keys, spec)
    return out


def check_keys(given: pa.Table, returned: pa.Table, keys: tuple[str, ...], spec: str) -> None:
    """TransformContractError unless every returned key is one of `given`'s, once (rows may be dropped)."""
    label = ", ".join(keys)
    missing = [k for k in keys if k not in returned.column_names]
    if missing:
        raise TransformContractError(
            f"transform {spec} returned no key column {', '.join(missing)} (dropped or renamed): a transform must"
            " keep every row's key unchanged; it may drop rows. Nothing of this chunk was inserted or marked")
    try:
        out = [returned.column(k).cast(given.column(k).type) for k in keys]
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise TransformContractError(f"transform {spec} changed the type of the key ({label}): {exc}") from exc
    if any(col.null_count for col in out):
        raise TransformContractError(f"transform {spec} set a key ({label}) to NULL: keys must stay as given")
    known = set(zip(*(map(_nan, given.column(k).to_pylist()) for k in keys), strict=True))
    seen: set[tuple[object, ...]] = set()
    for value in zip(*(map(_nan, col.to_pylist()) for col in out), strict=True):
        if value not in known:
            raise TransformContractError(
                f"transform {spec} returned key ({label}) = {_show(value)}, which is not a key of the rows it was"
                " given (re-keyed rows): keys must stay as given. Nothing of this chunk was inserted or marked")
        if value in seen:
            raise TransformContractError(
                f"transform {spec} returned key ({label}) = {_show(value)} more than once (duplicated rows): each"
                " row may come back at most once. Nothing of this chunk was inserted or marked")
        seen.add(value)


def _nan(value: object) -> object:
    """NaN never equals itself: compare float keys' NaN as one marker."""
    return "NaN" if value != value else value


def _show(value: tuple[object, ...]) -> str:
    return str(value[0]) if len(value) == 1 else str(value)
