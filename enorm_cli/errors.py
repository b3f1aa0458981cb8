"""The one exception type for user mistakes.

Library code raises ``EnormError(message)`` (``from None`` where it translates
another error); the CLI edge prints the message as one line on stderr and exits
non-zero. A message names the problem and the fix.
"""


class EnormError(Exception):
    """A user mistake or an environment problem the user can fix; never a bug.

    ``collective``: every process of a run raised the same error at the same point (a write
    one of them could not make), so the CLI prints it once, from the main process.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective
