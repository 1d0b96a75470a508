"""Backends: the ``Backend`` protocol, emulated devices (engine + physics) and their catalog."""
