"""Adapters that let other training frameworks write and read modelver checkpoints.

Each adapter lives in its own module and imports its framework itself, so importing
``modelver.integrations`` costs nothing: ``from modelver.integrations.transformers import ...``.
"""
