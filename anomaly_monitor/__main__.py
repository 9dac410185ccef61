"""``python -m anomaly_monitor``: the command line."""

from anomaly_monitor.cli import main

main(prog_name="anomaly-monitor")
