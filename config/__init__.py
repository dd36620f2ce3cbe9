"""Data only: the server preset registry and config.yaml's JSON Schema, installed as the
package proxy.registry (see pyproject.toml) and read with importlib.resources."""
