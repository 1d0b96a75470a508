"""The emulated device: continuous-batching engine, step-time physics, the device/model
catalog, the prefix cache and synthetic text, behind :class:`.emulated.EmulatedBackend`."""
