"""The event loop every long-running process of the pipeline uses."""

from __future__ import annotations


def install_uvloop() -> bool:
    """Use uvloop when it is installed (the `fast` extra): its loop costs far less per callback
    than asyncio's, which matters for the ingester's requests and faust's per-event tasks.
    Returns whether it is in use; without it the standard loop works the same, only slower."""
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True
