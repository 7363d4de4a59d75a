"""Prometheus exporter for Immich thumbnails, previews and their regeneration jobs."""

__version__ = "0.1.0"
