"""mmai.engine."""
