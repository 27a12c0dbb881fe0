"""Thin HTTP routes: validate, call a plain function, shape the response."""
