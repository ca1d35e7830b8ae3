"""`bench --live --broadcast-viewers N`: N MJPEG clients on the studio's broadcast while the live clients draw,
as OBS or VLC would watch it (studio/broadcast.py): what broadcasting costs the live frame rate, and how many
frames the viewers got."""

from __future__ import annotations

import http.client
import threading

PART = b"--lcmlive-frame\r\n"


class BroadcastViewers:
    """``n`` threads, each reading ``path`` on ``127.0.0.1:port`` and counting the parts it gets, until stop()."""

    def __init__(self, port: int, path: str, n: int):
        self.parts = [0] * n
        self.bytes = [0] * n
        self._stop = threading.Event()
        self._conns: list[http.client.HTTPConnection] = []
        self._threads = [threading.Thread(target=self._watch, args=(port, path, k), daemon=True) for k in range(n)]
        for thread in self._threads:
            thread.start()

    def _watch(self, port: int, path: str, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._conns.append(conn)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            if response.status != 200:
                return
            tail = b""
            while not self._stop.is_set():
                chunk = response.read1(65536)
                if not chunk:
                    return
                data = tail + chunk
                self.parts[k] += data.count(PART)
                self.bytes[k] += len(chunk)
                tail = data[-(len(PART) - 1):]  # a boundary split between two reads is counted once
        except (OSError, ValueError, AttributeError, http.client.HTTPException):  # AttributeError: closed mid-read
            return  # closed by stop(), or the server went away

    def stop(self) -> dict[str, list[int]]:
        """Close the viewers; each one's parts and bytes."""
        self._stop.set()
        for conn in self._conns:
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        return {"parts": list(self.parts), "bytes": list(self.bytes)}


def broadcast_line(counts: dict[str, list[int]]) -> str:
    """What :meth:`BroadcastViewers.stop` returned, as ``bench --live`` prints it."""
    return (f"broadcast: {len(counts['parts'])} viewer(s) got {', '.join(str(n) for n in counts['parts'])} frame(s) "
            f"({sum(counts['bytes']) / 2**20:.1f} MiB in all)")
