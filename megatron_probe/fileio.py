"""Writing files so that a process killed at any moment never leaves half of one.

``append_jsonl`` appends whole lines with one ``write`` call on a file opened for appending: a
kill lands before or after that call, so every line in the file is complete. ``write_whole``
writes a temporary file beside the target and renames it over the target: a reader sees the old
file or the new one, never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Iterable


def append_jsonl(path: str, rows: Iterable[Dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one call; the loop covers a short write
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_whole(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
