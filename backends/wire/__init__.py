"""OpenAI's wire format, in one package, shared by the gateway's API, the HTTP upstreams and
the emulated backend server:

* :mod:`.schemas` — request bodies (pydantic, unknown fields kept),
* :mod:`.requests` — a validated request to :class:`~backends.base.GenerationParams`, with the
  one context-length check,
* :mod:`.render` — response bodies, SSE chunks and the error envelope, as bytes,
* :mod:`.parse` — what an upstream answers (SSE streams, bodies, usage) and the body of an
  upstream leg.

Prompt token counting (chat framing, message text) is :mod:`backends.tokens`, shared with the
gateway's routing and the emulated devices.
"""
