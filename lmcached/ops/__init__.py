"""Operations: systemd notification, metrics and health, authentication, benchmarks."""
