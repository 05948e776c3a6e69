"""The runtime service: owns operations, runs their steps, stops them."""
