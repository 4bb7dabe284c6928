"""Adapters between modelver and other tools (training frameworks, experiment trackers).

Each adapter lives in its own module and imports its tool itself, so importing
``modelver.integrations`` costs nothing: ``from modelver.integrations.transformers import ...``.
"""
