"""User-facing errors: the CLI prints them as one line and exits with code 2, never a traceback."""


class OutriderError(Exception):
    """A problem with the user's input (recipe, file, name) that deserves one clear line, not a traceback."""
