"""Configuration: typed settings from the environment and the Celery config derived from them."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
