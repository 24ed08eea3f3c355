"""Errors that carry a message for the user rather than a traceback."""


class UserError(Exception):
    """Bad input (recipe, path, option, model, optimizer): the CLI prints the
    message as one paragraph and exits with code 2."""
