"""Files written whole or not at all: through a temporary file in the same folder, then a rename."""
import os
from typing import Callable

__all__ = ['write_atomic', 'write_text_atomic']


def write_atomic(path: str, write: Callable[[str], None]):
    """``write(tmp)`` writes the content to ``tmp``; it then replaces ``path`` in one rename, so a
    reader never sees a half-written file, and a failed write leaves nothing behind."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    write_atomic(path, write)
