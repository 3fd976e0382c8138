"""One exception type for bad input, so entry scripts can print it cleanly and exit non-zero."""


class ConfigError(ValueError):
    """The user's configuration or data cannot work; the message names the problem and the fix."""


def exit_on_config_error(run, cfg):
    """Entry scripts: bad input becomes ``error: ...`` on stderr and exit code 2, not a traceback."""
    import sys

    try:
        return run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
