"""OpenAI's wire format: request schemas (:mod:`.schemas`) and response rendering
(:mod:`.render`), shared by the gateway's API, the HTTP upstreams and the backend server."""
