"""Model backends of the node agent; ``build_backend`` picks one from the settings."""

from __future__ import annotations

from node_agent.backends.base import Backend
from node_agent.settings import NodeSettings


def build_backend(settings: NodeSettings) -> Backend:
    # Imported here so a node runs with only the dependencies of the backend it uses.
    if settings.backend == "ffmpeg":
        from node_agent.backends.ffmpeg import FfmpegBackend

        return FfmpegBackend(settings)
    if settings.backend == "heygem":
        from node_agent.backends.heygem import HeyGemBackend

        return HeyGemBackend(settings)
    from node_agent.backends.command import CommandBackend

    return CommandBackend(settings)
