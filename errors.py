"""User errors: one clear line and a non-zero exit, never a traceback."""
import functools
import sys


class UserError(Exception):
    """A mistake in the user's input (config, paths, data) that they can fix."""


def exit_on_user_error(main):
    """Wrap a script's main() so that a UserError prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapped
