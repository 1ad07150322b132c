"""Preset YAML configs for each fusion strategy."""
