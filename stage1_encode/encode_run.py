"""What the text and image encode runs share: the background shard writer."""

from __future__ import annotations

import queue
import threading


class ShardWriterThread:
    """Writes finished shards (``writer.write_shard(shard, payload)``) on a background thread so the next
    forward passes do not wait for disk.

    At most ``depth`` shards wait in the queue (bounding memory); an error on the thread is re-raised
    in the caller at the next ``put`` or at ``close``.
    """

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: list[int] = []
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            shard, rows = item
            try:
                self.writer.write_shard(shard, rows)
                self.written.append(shard)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = err

    def put(self, shard: int, rows) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((shard, rows))

    def close(self, raise_error: bool = True) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error
