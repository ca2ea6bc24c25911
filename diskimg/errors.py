"""The one exception family of diskimg.

Every error a caller can see derives from :class:`DiskImageError` and carries the exit code the CLI
uses for it, so that the CLI maps exceptions to exit codes in one place.
"""

from __future__ import annotations

# Exit codes of the command-line tool (documented in README.md).
EXIT_OK = 0
EXIT_NO = 1  # a "no" answer: not importable, images differ
EXIT_USAGE = 2
EXIT_INPUT = 3  # the input image cannot be read: missing, unsupported or corrupt
EXIT_OUTPUT = 4  # the output cannot be written
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70  # a bug of diskimg (or, in a batch, a worker process that kept dying)


class DiskImageError(Exception):
    """Root of every error diskimg raises."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ImageNotFound(DiskImageError):
    """The image file does not exist or cannot be opened by the operating system."""


class UnsupportedFormat(DiskImageError):
    """A format diskimg recognises but does not read, or a feature of a format it does not implement."""

    def __init__(
        self, message: str, *, path: str | None = None, format: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.format = format
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}; {self.hint}" if self.hint else text


class CorruptImage(DiskImageError):
    """The image breaks its format's rules; ``offset`` and ``structure`` say where."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        structure: str | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.offset = offset
        self.structure = structure

    def __str__(self) -> str:
        where = self.structure or ""
        if self.offset is not None:
            where = f"{where} at offset {self.offset}" if where else f"at offset {self.offset}"
        text = f"{self.message} ({where})" if where else self.message
        return f"{self.path}: {text}" if self.path else text


class BackingFileError(DiskImageError):
    """A backing file (qcow2) or parent (differencing VHD) is needed but not allowed or not found."""


class FormatMismatch(DiskImageError):
    """A format forced with ``-f`` does not match the file's header."""


class OutputError(DiskImageError):
    """The output cannot be written (exists, unwritable, disk full)."""

    exit_code = EXIT_OUTPUT


class UsageError(DiskImageError):
    """A wrong option or option value given to the API or the CLI."""

    exit_code = EXIT_USAGE


class ArchiveError(DiskImageError):
    """An archive (tar, compressed wrapper, export set) is malformed or hostile."""


def error_line(exc: DiskImageError) -> str:
    """The one line the command prints for ``exc`` (and a batch journals for a failed job)."""
    return f"diskimg: error: {exc}"


def internal_error_line(exc: Exception) -> str:
    """The one line for an exception that is a bug of diskimg, not a fault of the input."""
    return f"diskimg: internal error: {type(exc).__name__}: {exc} (set DISKIMG_DEBUG=1 for a traceback)"
