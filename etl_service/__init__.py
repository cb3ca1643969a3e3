"""etl-service: PostgreSQL rows into a ClickHouse trigger table, exactly once, on a schedule."""

__version__ = "0.1.0"
