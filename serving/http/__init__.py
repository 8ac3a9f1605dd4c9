"""The OpenAI-compatible HTTP API (FastAPI): `serving.http.app.create_app(state)`."""
