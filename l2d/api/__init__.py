"""The daemon's REST API (aiohttp): app factory and middleware in app.py, shared HTTP helpers in http.py, the
typed application keys in deps.py, and one module of routes per subsystem."""
