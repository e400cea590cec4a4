"""Code both stages import: architecture probing, devices, data, the mask artifact, hooks.

`shared` imports neither `fn_analyze` nor `fn_train`. Importing it sets OMP_WAIT_POLICY=PASSIVE
where the user has not and torch is not loaded yet (`shared.threads.passive_wait_unless_set`).
"""

from importlib.metadata import PackageNotFoundError, version

from shared.threads import passive_wait_unless_set

try:
    __version__ = version("functional-networks")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

passive_wait_unless_set()
