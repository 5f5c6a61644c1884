"""The one error type the embedded cluster raises for problems a user can fix."""


class ClusterError(RuntimeError):
    """Something the embedded cluster cannot do; the message says what and how to fix it."""
