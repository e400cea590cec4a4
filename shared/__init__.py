"""Code both stages import: architecture probing, devices, data, the mask artifact, hooks.

`shared` imports neither `fn_analyze` nor `fn_train`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("functional-networks")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
