"""mmai.data."""
