"""Grafana dashboards, Prometheus alerts and scrape examples for pdserve's `pdserve_*` series."""
