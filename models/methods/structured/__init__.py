"""Structured-family methods: hyperbolic networks (and, later, continual, federated, graph, recommender and EHR)."""
