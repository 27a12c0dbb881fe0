"""The KV-cache kit: a compressed `Cache`, the prefill hook that compresses it, budgets and KV-bytes accounting."""
