"""Files written whole: to a temporary name in the same folder, then renamed into place, so that an
interrupted run or a second process writing at once never leaves a torn file."""

import os
import tempfile
from pathlib import Path


def write_whole(path: Path, data: bytes | str) -> None:
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=path.name, suffix=".partial", delete=False) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(f.name, path)
