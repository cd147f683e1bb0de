"""What ``kinetoscope optimize`` writes and the streaming readers check, shared by ``framework.data.streaming`` (the
command and the data module) and ``framework.data.streaming_dataset`` (the LitData dataset, imported only when
streaming is used): the item schema, the error for unreadable streams, and LitData's chunk-download switch."""

from __future__ import annotations

STREAM_SCHEMA = "kinetoscope.clip/1"  # changes whenever the item layout (framework/data/streaming.py) changes


class StreamDataError(ValueError):
    """A streamed dataset that cannot be read: unreachable or missing storage, another schema, a corrupt chunk."""


def _chunks_through_boto3() -> None:
    """LitData (0.2.76) downloads chunks with obstore when it is installed, and builds obstore's client without
    ``allow_http``, so from an ``http://`` endpoint it gets the index (through boto3) and then fails on every chunk
    ("builder error"). LitData's own switch for "obstore not usable in this process" (a forked child of a process
    that started it) sends the chunks through boto3 instead; it is per process, so every worker calls this."""
    from litdata.streaming import downloader

    downloader._OBSTORE_INIT_PID = -1  # no process has this id: obstore_usable() is False
