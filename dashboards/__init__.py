"""The Grafana dashboard's generator (``python dashboards/generate.py``), importable for the tests."""
