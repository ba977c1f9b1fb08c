"""User-facing errors of the daemon and CLI."""
from engine.errors import InputError


class UserError(InputError):
    """A problem the user can fix; the CLI prints its message as one line and exits with code 2."""
