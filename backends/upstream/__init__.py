"""Real upstreams (vLLM, SGLang, any OpenAI server) over the project's own pooled HTTP/1.1
client (:mod:`.httpclient`); :class:`.http.HttpBackend` implements the ``Backend`` protocol."""
