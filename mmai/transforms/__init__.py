"""mmai.transforms."""
