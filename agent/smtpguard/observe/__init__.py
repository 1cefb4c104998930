"""What the agent tells the outside: Prometheus collectors read at scrape time
(metrics' health and totals, the datapath, enforcement and trip-wire
collectors, the exporter) and the webhook. It reads datapath, enforce,
inventory and policy; nothing here imports daemon/, api/ or respond/."""
