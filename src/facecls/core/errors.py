"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class FaceclsError(Exception):
    """A mistake the user can fix (bad path, bad recipe, missing weights, ...).

    The message must say what is wrong and what to do about it.
    """
