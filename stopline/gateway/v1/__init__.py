"""Generated from protos/stopline/gateway/v1: do not edit."""
