"""mmai.clinical."""
