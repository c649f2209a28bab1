"""``mobilemoe serve``: an OpenAI-compatible HTTP server over the generation engine.

* :mod:`~mobilemoe.serve.protocol`: request schemas, OpenAI-shaped errors and response bodies.
* :mod:`~mobilemoe.serve.worker`: the one generation thread (the engine is not thread-safe), fed by a
  bounded queue; streams text deltas with ``stop`` strings held back and trimmed.
* :mod:`~mobilemoe.serve.app`: the FastAPI routes (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``), server-sent events, timeouts and client disconnects.
"""

from mobilemoe.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
