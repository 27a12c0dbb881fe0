"""The inference engine: deployments' warm models, their engine options, continuous batching of LLM requests.

`api` calls it; it calls `workers` and `models` and never the other way. It raises `serving.errors` types,
which the API turns into problem bodies.
"""
