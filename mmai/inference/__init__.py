"""mmai.inference."""
