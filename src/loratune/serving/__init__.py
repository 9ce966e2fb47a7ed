"""Many adapters on one base model: the adapter registry (stacked slots, LRU), batched mixed-adapter decoding with
continuous batching, and an OpenAI-compatible HTTP server (``loratune serve``).

``Server`` holds the model, registry and scheduler; ``create_app(server)`` is the FastAPI app (imported on use, so
``loratune.serving`` does not need FastAPI to be imported).
"""

from .engine import Engine, Sampling
from .layers import wrap_linear_layers
from .loader import AdapterLoader
from .registry import AdapterRegistry, NoFreeSlot, NotLoaded, ServingError
from .scheduler import POLICIES, Scheduler, Sequence
from .server import Server


def create_app(server: Server, manage_lifecycle: bool = True):
    """The FastAPI app over ``server`` (see ``serving.app``)."""
    from .app import create_app as _create

    return _create(server, manage_lifecycle)


__all__ = ["POLICIES", "AdapterLoader", "AdapterRegistry", "Engine", "NoFreeSlot", "NotLoaded", "Sampling", "Scheduler",
           "Sequence", "Server", "ServingError", "create_app", "wrap_linear_layers"]
