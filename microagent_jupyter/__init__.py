"""Jupyter surface of microagent (magics, widgets, server extension). Built on microagent_engine's Python API."""
