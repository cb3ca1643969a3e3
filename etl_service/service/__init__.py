"""Operating the service: the daemon, its wake-ups and the commands people run.

    cli      the command line: `run` (daemon or `--once`), `check`, `status`, `requeue`, `adopt`,
             `release`, `demo`; exit codes
    daemon   the long-running process: an APScheduler BackgroundScheduler firing each job
    wake     wake-ups on commit (ETL_WAKE=notify): the trigger, LISTEN, coalescing
    checks   read-only inspection: start-up checks and `check`
    report   `status`, as text or JSON
    admin    commands that change the ledger by hand
    systemd  sd_notify for Type=notify units
    demo     the real cycle on embedded servers

The top of the tree: it drives `run` and reads the ledger, the two databases and `settings`;
nothing imports it but `etl_service.__main__` and the console script.
"""
