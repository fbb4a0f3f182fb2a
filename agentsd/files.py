"""Files written whole: to a temporary name in the same folder, then renamed into place, so that an
interrupted run or a second process writing at once never leaves a torn file."""

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)


def write_whole(path: Path, data: bytes | str) -> None:
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(partial, 0o666 & ~_UMASK)  # as open() would make it (mkstemp makes 0600)
        os.replace(partial, path)
    except BaseException:  # Ctrl-C too: no temporary file left behind
        Path(partial).unlink(missing_ok=True)
        raise
