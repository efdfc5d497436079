"""Output directories that appear whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidConfigError, OutputExistsError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early (before any heavy work) when ``out`` cannot be written as requested."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: -o artifacts/x works on a fresh checkout
    except OSError as error:
        raise OutputExistsError(f"cannot create the parent directory {parent}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputExistsError(f"cannot write into {parent} (read-only or no permission): choose another -o")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to ``out``; move it to ``out`` only if the block succeeds."""
    out = Path(out)
    check_output_dir(out, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = staging.with_name(staging.name.replace("staging", "old"))
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def check_output_files(*paths: Path | None) -> None:
    """Fail before any heavy work when an output file cannot be written (``None`` entries are skipped)."""
    for path in paths:
        if path is not None and not Path(path).expanduser().resolve().parent.is_dir():
            raise InvalidConfigError(f"cannot write {path}: its directory does not exist (create it first)")


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
