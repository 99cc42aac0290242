"""User-facing errors: the CLI prints these as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input from a user (a path, a name, an option): the message names the problem and the fix."""
