"""The package version, in one place that imports nothing (the writer records it in every manifest)."""

__version__ = "0.1.0"
