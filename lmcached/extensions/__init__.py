"""In-process extensions: the registry of storage backends, remote connectors, codecs, eviction
policies, general plugins and stat loggers, where its entries come from, their lifecycle and the
guard around them."""
