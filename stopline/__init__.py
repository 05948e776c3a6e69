"""Stopline: the ground floor both services stand on: the generated wire contracts (stopline.v1,
stopline.gateway.v1), domain errors and their gRPC mapping, limits, transport and serving plumbing,
rendering of operations and events. It imports nothing of the services or of the command above
them (tests/test_layers.py)."""
