"""Config schema and YAML profiles."""
