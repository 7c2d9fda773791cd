"""`avindex serve`: a FastAPI app over one indexed store (search API, clip media, one web page).

Imported only by `avindex serve` (the CLI imports it lazily): FastAPI and uvicorn are the
optional `serve` extra."""
