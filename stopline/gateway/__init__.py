"""Generated contracts."""
