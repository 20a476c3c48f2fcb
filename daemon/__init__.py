"""The wattprint daemon: sources, attribution, ledger, HTTP API and CLI."""
