"""Integrations with training frameworks; each module imports its framework (an optional dependency)."""
