"""kata-ipu: off-host container image preparation for runc and Kata Containers.

The package is a library first. Nothing here runs at import time: daemons, clients and the
ttrpc machinery are started explicitly by their console-script entry points or by tests.
"""

__version__ = "0.1.0"
