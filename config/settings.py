"""Re-exports :mod:`genq.settings`, where the settings are defined."""

from genq.settings import Settings, SettingsError, get_settings, load_settings

__all__ = ["Settings", "SettingsError", "get_settings", "load_settings"]
