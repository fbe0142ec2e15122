"""The set-up error of a bad command line or config value (``args.ArgumentError``; here so that the argument
modules — ``args``, ``schedulers`` — can share it without importing each other)."""


class ArgumentError(ValueError):
    """A bad command line or config file value; the message names it and says what is valid."""
