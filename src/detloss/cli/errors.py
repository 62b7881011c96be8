"""The one error type of the command line, and the errors it turns into a one-line message."""
from __future__ import annotations

import json


class CLIError(Exception):
    """A user error (bad file, bad option): printed as one line on stderr, exit code 2."""


# What the command-line boundary reports as a one-line message instead of a traceback: the
# library's input checks (ValueError / TypeError name the argument), file errors, bad JSON.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, json.JSONDecodeError)
