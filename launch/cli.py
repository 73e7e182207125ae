"""Entry-point plumbing shared by the launchers: user errors end the job with one clear line."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from data.reader import DataError
from data.schema import SchemaError

# Mistakes in config or data: the message already names the key, file, column or value, so a traceback
# from deep inside the job would only bury it.
USER_ERRORS = (SchemaError, DataError, FileNotFoundError, ValueError)


def exit_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("RANKMIXER_TRACEBACK"):
                raise
            rank = os.environ.get("RANK", "0")
            print(
                f"error [rank {rank}]: {type(e).__name__}: {e}\n(RANKMIXER_TRACEBACK=1 shows the traceback)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)

    return wrapper
