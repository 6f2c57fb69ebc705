"""Adapters between training frameworks and the engine."""
