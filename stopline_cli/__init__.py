"""The `stopline` command: the top floor, over both services and the shared `stopline` package."""
