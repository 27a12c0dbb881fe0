"""Serving: the warm models of deployments and their engine options."""
