"""Method implementations, one module per paper, grouped by family; discovered by the registry."""
