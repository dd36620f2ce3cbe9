"""model-proxy: a sidecar that runs a model server and proxies traffic to it."""
