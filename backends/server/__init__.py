"""``pdgate backend``: one emulated instance served over HTTP, speaking OpenAI and both P/D
handshakes (vLLM's NIXL ``kv_transfer_params`` and SGLang's bootstrap rooms), so it can stand
in for a vLLM or SGLang server behind any router.

Example::

    config = InstanceConfig(device="h100-sxm", model="llama-3.1-8b", role="prefill", port=8100)
    app = create_backend_app(config)          # backends.server.app
    uvicorn.run(app, port=config.port)
"""
