"""Configuration data shipped with pdgate: gateway defaults, device and model profiles."""
