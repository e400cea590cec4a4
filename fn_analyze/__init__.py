"""Find functional networks (ICA over MLP neurons) in a language model.

Importing it checks that `shared` is this project's package: a `shared/` package in the folder
Python runs from comes first on the path and shadows it, which otherwise surfaces later as
"cannot import name '__version__' from 'shared'" deep in some module.
"""

from pathlib import Path

import shared

_OURS = Path(__file__).resolve().parent.parent / "shared"
if Path(getattr(shared, "__file__", None) or "").resolve().parent != _OURS:
    found = getattr(shared, "__file__", None) or ", ".join(getattr(shared, "__path__", []))
    raise ImportError(
        f"the package 'shared' was imported from {found}, not from {_OURS}: a folder named shared/ where "
        "Python runs (or earlier on sys.path) shadows functional-networks' own; run from another folder or "
        "rename that one"
    )
