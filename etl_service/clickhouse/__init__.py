"""The target side: everything the service asks of ClickHouse about the trigger table.

    clients       connections per kind of target (HTTP(S), in-process chDB), driver errors, plain SQL
    target_table  the table: create it, describe it, its grants and views, its ALTERs
    guard         does it drop a repeated insert token; in latest mode, does it keep the newest version
    evolution     its columns from the source's: the CREATE of a new target, the ALTERs that follow the source
    fit           do a chunk's values fit the target's types exactly (pure checks on Arrow data)
    inserts       deduplicated inserts, under settings that make the token count
    readback      what the target holds: a batch's rows for verification, rows and versions to reconcile
    readiness     the job's readiness query, checked and polled

It offers the run and the service these statements and decisions; it imports `postgres.catalog`
(the source's shape it mirrors), `settings` and `errors`, never the ledger or the run.
"""
