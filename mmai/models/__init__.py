"""mmai.models."""
