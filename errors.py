"""User errors: one clear line and a non-zero exit, never a traceback; so is a Ctrl-C."""
import functools
import signal
import sys

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (SIGINT), as shells report one: 128 + 2


class UserError(Exception):
    """A mistake in the user's input (config, paths, data) that they can fix."""


def exit_on_user_error(main=None, *, interrupted="interrupted: nothing half-written is left; run the same command "
                                                "again to continue"):
    """Wrap a script's main() so that a UserError prints one line and exits with status 2, and a Ctrl-C
    (KeyboardInterrupt) prints the line `interrupted` (what the script leaves behind, and how to go on) and
    exits with status 130. `@exit_on_user_error` or `@exit_on_user_error(interrupted=...)`."""
    if main is None:
        return functools.partial(exit_on_user_error, interrupted=interrupted)

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            pass  # leaving the block frees the traceback, whose frames hold the progress bars: they end their lines
        # The finally blocks on the way here have closed worker pools and removed temp files. A second Ctrl-C
        # while the interpreter exits would print a traceback from an atexit handler: the command ignores it
        # (not a caller that runs main() in its own process, such as a test session).
        if main.__module__ == "__main__":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(interrupted, file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)

    return wrapped
