"""The one error type for bad user input."""


class InputError(ValueError):
    """Bad input from the user. The message names the input and says what would fix it."""
