"""Generated from protos/stopline/v1: do not edit."""
