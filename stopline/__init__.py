"""Stopline's ground floor, under both services: wire contracts, errors, limits, transport.

The generated contracts (stopline.v1, stopline.gateway.v1), domain errors and their gRPC mapping,
limits, event kinds, JSON values, rendering for the command line, transport and serving plumbing.
It imports nothing of the services or of the command above them (tests/test_layers.py).
"""
