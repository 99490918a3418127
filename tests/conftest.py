"""Suite-wide settings: hypothesis draws the same examples on every run, so a CI result does not
depend on the day's random draws (and no example database is written into the checkout)."""

from hypothesis import settings

settings.register_profile("fastlvm", derandomize=True, database=None)
settings.load_profile("fastlvm")
