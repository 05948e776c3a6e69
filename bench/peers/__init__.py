"""Peer systems measured next to Stopline (installed from the `bench` extra)."""
