"""PACS and paperless-film server: the application (settings, CLI, process wiring, DIMSE)."""

__version__ = "0.1.0"
