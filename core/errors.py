"""Errors a user can cause, each with a message that says what to do.

Only these are shown to users as messages (the app turns them into ``gr.Error`` / a one-line CLI error).
Anything else is a bug and propagates with its traceback.
"""


class SadTalkerError(Exception):
    """Base class: a problem with the user's input or installation, explained in the message."""


class InputError(SadTalkerError):
    """The image, audio or an option cannot be used as given."""


class NoFaceError(InputError):
    """No face was found in the portrait."""


class CheckpointError(SadTalkerError):
    """A checkpoint file is missing, truncated or not the expected one."""


class DependencyError(SadTalkerError):
    """A package a feature needs is missing or does not load; the message says what to install."""
