"""Training presets shipped with atc (TOML files in this package)."""
