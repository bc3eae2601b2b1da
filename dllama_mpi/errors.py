"""The one error class for the user's mistakes.

InputError (and its subclasses: the model file's, the converter's, the command line's) is
raised for bad input only: a flag, a budget, a prompt, a file that can't be used. Its
message says what was expected, what was found and what to do. The entry points catch it
by name and print `error: <message>` once, exit code 2. Anything else is a bug and
surfaces with its traceback.
"""


class InputError(Exception):
    """Bad input from the user, with what was expected, what was found and what to do."""


class UsageError(InputError):
    """Bad input found identically on every rank (or agreed on through rank 0): every rank
    exits with code 2 and rank 0 prints the message once."""
