"""The HTTP stage: the server, what the frontends share (request running, errors, OpenAPI, safe JSON)
and the Prometheus metrics. Imported only by the server and the frontend plugins."""
