"""Package and wire-protocol versions."""

__version__ = "0.1.0"

# Bumped on any incompatible change to the header fields or frame layout (docs/protocol in
# lmcached/protocol.py). Clients and workers refuse a peer with another major version.
PROTOCOL_VERSION = 1
