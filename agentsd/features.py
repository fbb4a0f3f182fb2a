"""`--features`: a feature network for FID other than Inception, named as `module:callable` (a module on
sys.path or in the current folder) or `path/to/file.py:callable`, as a user would name one."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

FORMS = "module:callable (a module importable or in the current folder) or path/to/file.py:callable"


def load_feature_network(spec: str):
    """The network that spec's callable returns; ValueError naming --features and what went wrong."""
    target, colon, name = spec.rpartition(":")
    if not colon or not target or not name.isidentifier():
        raise ValueError(f"--features must be {FORMS}, got {spec!r}")
    is_path = target.endswith(".py") or os.sep in target
    module = _module_from_file(Path(target), spec) if is_path else _module(target, spec)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--features {spec}: {target} has no callable {name!r}")
    try:
        return factory()
    except Exception as error:
        raise ValueError(f"--features {spec}: {name}() failed ({_reason(error)})") from None


def _module(name: str, spec: str):
    # `python -m` puts the current folder on sys.path, the `agentsd` console script does not: a user
    # who names a module file of the current folder means that one either way.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # the module itself, not one that it imports
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            raise ValueError(f"--features {spec}: no module {name!r} on sys.path or in {cwd}; give {FORMS}") from None
        raise ValueError(f"--features {spec}: importing {name} failed (ModuleNotFoundError: {error})") from None
    except Exception as error:
        raise ValueError(f"--features {spec}: importing {name} failed ({_reason(error)})") from None
    finally:
        if added:
            sys.path.remove(cwd)


def _module_from_file(path: Path, spec: str):
    if not path.is_file():
        raise ValueError(f"--features {spec}: there is no file {path}")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(f"--features {spec}: running {path} failed ({_reason(error)})") from None
    return module


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no message'}"
