"""OpenAI wire format; it lives in :mod:`backends.openai_wire` (shared with the emulated
backend server), re-exported here for the gateway."""

from backends.openai_wire import DONE, WireFormat, error_envelope, usage_dict

__all__ = ["DONE", "WireFormat", "error_envelope", "usage_dict"]
