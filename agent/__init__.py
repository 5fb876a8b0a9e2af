"""Ambit's node agent, its CA and its command line."""

# The one place the version is written (pyproject.toml reads it): the agent reports it without importing
# importlib.metadata, which with the email, zipfile and csv modules it pulls in costs the agent 2 MiB.
__version__ = "0.1.0"
