"""Classification-family methods (notes: shared/methods/classification.md)."""
