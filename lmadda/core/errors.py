"""One exception type for every error a user can cause.

The CLI turns an `LmaddaError` into a one-line message and a non-zero exit code; anything else
is a bug and keeps its traceback. Messages name the file, field or value and say what is accepted.
"""


class LmaddaError(Exception):
    """A problem with the user's input (file, config value, manifest), described for a person."""
