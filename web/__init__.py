"""The HTTP front end: aiohttp app, chat API, SSE, admin API, auth, pages."""
