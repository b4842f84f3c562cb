"""The HTTP layer: the FastAPI app, its routers (a few lines each, calling app.core), request and
response schemas, problem+json errors, authentication, rate limits and metrics middleware."""
