"""mngr's built-in provider backends, one module per backend.

Installed as the package ``mngr_providers`` (see pyproject.toml), so the
generic name ``providers`` never collides with another distribution; mngr.py
also loads this directory directly when it runs from a checkout.
"""
