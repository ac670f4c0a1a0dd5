"""The stylize.v1 API."""
