"""Deployment files, installed as the package data of ``wattprint.deploy``.

Nothing to import: this marker lets the wheel carry the systemd unit, the example
config, the Prometheus config and rules and the Grafana provisioning and dashboards, so
that ``wattprint deploy systemd|prometheus|grafana DIR`` can write them out without a
checkout (daemon/deploy.py).
"""
