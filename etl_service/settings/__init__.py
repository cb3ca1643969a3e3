"""Settings, declared once and read once: `.env`, the environment and the jobs file, validated and frozen.

    declared           every setting (`SECTIONS`): variable, default, reader, help; the readers
    reading            read and validate them into `Settings` (`load`); the only reader of os.environ
    model              `Settings` and `JobConfig`, frozen
    clickhouse_target  where ClickHouse is: the CLICK_* settings as a `ClickHouseTarget`
    cron               crontab(5) schedules as APScheduler triggers
    docgen             `.env.example` and the docs reference, generated (`python -m etl_service.settings`)

Every other package reads its settings from here; this package imports only `errors` and `faults`.
"""
