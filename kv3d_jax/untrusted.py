"""Values, files and paths that come from outside kv3d: quoted safely, read only when regular, written
only inside the output folder.

Every message that echoes a value from an input (a file's contents, a command-line argument) shows
it through :func:`quote` or :func:`escape`: at most a short prefix, on one line, with control and
non-ASCII characters escaped, so neither a huge value nor a forged line can reach the terminal.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# The most characters of an input value a message shows.
QUOTE_LIMIT = 60
# Integers longer than this many bits are described, not written out (writing one is quadratic).
_INT_BITS = 256


def escape(text: str, limit: int = 1000) -> str:
    """``text`` cut to ``limit`` characters, with control, non-ASCII and line-breaking characters
    escaped (``\\n``, ``\\x1b``, ``\\u2028`` ...): one printable line."""
    cut = text[:limit]
    return ascii(cut)[1:-1].replace("\\'", "'") + ("..." if len(text) > limit else "")


def printable(text: str, limit: int = 2000) -> str:
    """``text`` cut to ``limit`` characters with every character that is not printable (controls, line
    and paragraph separators, format characters) written as its escape; backslashes and other
    printable characters are left as they are, so text already escaped is not escaped again."""
    cut = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit])
    return cut + ("..." if len(text) > limit else "")


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """A short, one-line, escaped text for ``value`` from an input, at most about ``limit`` characters.

    Strings and bytes are quoted (a prefix of at most ``limit`` characters, then ``...``); numbers
    written out (an integer of more than 256 bits is described by its size); short tuples and lists
    of such values shown item by item; any other object described by its type.
    """
    text = _render(value, limit)
    if isinstance(value, str) or len(text) <= limit + 3:
        return text
    return text[:limit] + "..."


def _render(value, limit: int) -> str:
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        bits = value.bit_length()
        return repr(value) if bits <= _INT_BITS else f"<an integer of {bits:,} bits>"
    if isinstance(value, str):
        return "'" + escape(value, limit) + "'"
    if isinstance(value, (bytes, bytearray)):
        return ascii(bytes(value[:limit])) + ("..." if len(value) > limit else "")
    if isinstance(value, (tuple, list)):
        parts, length = [], 0
        for item in value[:8]:
            parts.append(_render(item, limit))
            length += len(parts[-1]) + 2
            if length > limit:
                break
        more = ", ..." if len(parts) < len(value) else ""
        ends = "()" if isinstance(value, tuple) else "[]"
        return ends[0] + ", ".join(parts) + more + ("," if len(value) == 1 and ends == "()" else "") + ends[1]
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and hasattr(value, "dtype"):
        return f"<a {escape(str(value.dtype), 30)} array of shape {shape}>"
    return f"<a {escape(type(value).__name__, 40)}>"


def regular_file(path, what: str = "file") -> Path:
    """``path`` as a :class:`Path`, if it is a regular file (or a link to one); checked before it is
    opened, so a pipe, a device or a socket is never read (a pipe would block, a device never end).

    Raises FileNotFoundError if nothing is there, ValueError naming the kind of file otherwise.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise ValueError(f"{what} {path} is {kind}; kv3d reads regular files only")
    return path


def output_path(root, *names: str) -> Path:
    """The path ``root/names[0]/names[1]/...`` of a file kv3d writes, checked to lie inside ``root``.

    Each name must be one plain path component (no separator, not ``.`` or ``..``, no control
    character), and the path, with every link resolved, must stay inside ``root`` (resolved): the
    one check every writer's path goes through, so that no name can place a file elsewhere.
    Raises ValueError otherwise.
    """
    root = Path(root)
    for name in names:
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name
                or (os.altsep and os.altsep in name) or any(ord(c) < 32 or ord(c) == 127 for c in name)):
            raise ValueError(f"kv3d will not write a file named {quote(name)}: names of written files are one "
                             f"plain path component inside the output folder {root}")
    path = root.joinpath(*names)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise ValueError(f"kv3d will not write {path}: it resolves to {escape(str(path.resolve()), 200)}, outside "
                         f"the output folder {base}")
    return path
