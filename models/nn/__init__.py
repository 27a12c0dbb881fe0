"""Shared neural-network building blocks (backbones) used across method families."""
