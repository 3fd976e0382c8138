"""One exception type for bad input, so entry scripts can print it cleanly and exit non-zero."""


class ConfigError(ValueError):
    """The user's configuration or data cannot work; the message names the problem and the fix."""
