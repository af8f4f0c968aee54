"""`cl serve`: a local OpenAI-compatible API over the champion model. `schemas` (request and error shapes, pure
checks), `worker` (the generation and writer threads, the Service holding them), `app` (the FastAPI app, guards,
routes, and the uvicorn server). Stands on loop, chat, capture and everything below."""
