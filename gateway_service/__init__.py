"""The gateway service: faces clients, starts and streams operations, delivers their stops."""
