"""The graph explorer: `cltrace serve` (a local web app over a folder of attribution graphs)."""

from cltrace.serve.app import assets_built, create_app, serve

__all__ = ["assets_built", "create_app", "serve"]
