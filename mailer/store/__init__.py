"""Storage: the schema, its migrations, and the rows the rest reads and writes."""
