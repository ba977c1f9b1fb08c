"""Errors the engine raises for problems a user can fix (bad files, bad options)."""


class InputError(ValueError):
    """A user-facing problem with an input: a missing or malformed file, an impossible option.

    The message is one line saying what is wrong, where, and what to do.
    """
