"""Storages: where rows come from and where finished rows go."""

from capflow.storage.base import Storage
from capflow.storage.file import FileStorage
from capflow.storage.streaming import StreamingStorage

__all__ = ["FileStorage", "Storage", "StreamingStorage"]
