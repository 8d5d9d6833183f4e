"""Errors the engine raises on purpose.

Every message says what was wrong and how to fix it; the CLI prints it as one
line and the ComfyUI nodes show it in the UI, so no traceback is needed to act on it.
"""


class AnyV2VError(ValueError):
    """Bad input, bad settings or a bad model folder: the user can fix it."""


class ModelLoadError(AnyV2VError):
    """A model folder or checkpoint that cannot be used (missing, incomplete, unsafe, wrong class)."""


class AnyV2VOutOfMemory(RuntimeError):
    """The accelerator ran out of memory; the message names the options that lower peak memory."""
