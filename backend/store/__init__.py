"""The database: records, the SQL store, migrations and the write-behind writer."""
