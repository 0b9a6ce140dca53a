"""User-facing errors: one line that names the problem and the fix, exit code 2."""


class UserError(Exception):
    """Bad input or an unmet precondition; the CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2


class RunFailed(Exception):
    """Work was attempted and some of it failed (named in the message); the CLI exits 1."""

    exit_code = 1


class ConnectTimeout(UserError):
    """The cluster did not answer in time; ``ray.init`` may still be waiting, so the CLI leaves at once."""
