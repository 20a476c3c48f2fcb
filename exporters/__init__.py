"""Exporters that read the daemon's immutable snapshots: Prometheus and InfluxDB."""
