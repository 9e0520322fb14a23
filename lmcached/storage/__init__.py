"""Storage tiers: the StorageBackend interface, the CPU tier, eviction policies, the TieredStore."""
