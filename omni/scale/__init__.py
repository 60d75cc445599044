"""Past one machine on Ray: `omni serve --ray` on Ray Serve (serve.py), `omni caption --ray` on Ray Data
(data.py). Nothing here is imported without --ray: Ray is an extra (`pip install -e '.[ray]'`)."""
