"""The user-facing error type. The CLI prints these as one clear line (no traceback)."""


class MobileMoEError(Exception):
    """Bad input or state the user can fix: the message names the file/field, expected vs got."""
