"""Stopline: the generated wire contracts (stopline.v1) and the `stopline` command."""
