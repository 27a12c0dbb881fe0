"""Representation-family methods (notes: shared/methods/representation-and-structured.md)."""
