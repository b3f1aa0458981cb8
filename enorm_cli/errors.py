"""The one exception type for user mistakes.

Library code raises ``EnormError(message)`` (``from None`` where it translates
another error); the CLI edge prints the message as one line on stderr and exits
non-zero. A message names the problem and the fix.
"""


class EnormError(Exception):
    """A user mistake or an environment problem the user can fix; never a bug."""

    exit_code = 2
