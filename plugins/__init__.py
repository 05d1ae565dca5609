"""First-party plugins of the broker, registered through entry points in pyproject.toml."""
