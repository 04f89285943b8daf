"""Shared hypothesis strategies: one place for unit tests, machines and the fault catalogue."""
