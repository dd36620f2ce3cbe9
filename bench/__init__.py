"""The benchmark: model-proxy side by side with nginx (`python -m bench`; see README.md)."""
