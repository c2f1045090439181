"""The engine's own exceptions: bad user input, and a run the caller cancelled."""


class InputError(ValueError):
    """Bad input from the user. The message names the input and says what would fix it."""


class TrainingCancelled(Exception):
    """Raised when a cancel check says stop; nothing was written and the model is unchanged.

    It lives here rather than in train.py because class-image drawing (prior.py) raises it too.
    """


class SaveFailed(InputError):
    """A trained result could not be written where asked (a full disk, a file-size limit). `result` keeps it in
    memory; the message says where a recovery copy was written, if one could be."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
