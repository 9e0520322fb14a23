"""In-process extensions: the registry of storage backends, remote connectors, codecs and
eviction policies, where its entries come from, their lifecycle and the guard around them."""
