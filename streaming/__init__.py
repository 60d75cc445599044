"""The engine worker, sessions and the websocket server (issues: streaming engine, session manager)."""
