"""Offline evaluation: metrics, importers of logged data, the harness that replays impressions."""
