"""The downloads baselines: ``requests`` streaming files to disk with N threads.

    python -m benchmarks.plain_download URLS_JSON OUT_DIR THREADS [plain|integrity]

``plain``: stream each file to disk, nothing else (what a script without checks does).
``integrity``: the same integrity work genqueue does on every file, and nothing of its safety checks:
sha256 over the bytes in the read loop, written to a temp file, fsynced once, renamed into place.

Prints one JSON line: seconds, bytes, files, the process's RSS before and its peak RSS (bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

CHUNK = 256 * 1024  # genqueue's default GENQ_DOWNLOAD_CHUNK_BYTES

_local = threading.local()


def _session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def fetch(url: str, dest: Path) -> int:
    size = 0
    with _session().get(url, stream=True, timeout=(5, 30)) as response:
        response.raise_for_status()
        with open(dest, "wb") as out:
            for chunk in response.iter_content(chunk_size=CHUNK):
                out.write(chunk)
                size += len(chunk)
    return size


def fetch_checked(url: str, dest: Path) -> int:
    size = 0
    digest = hashlib.sha256()
    part = dest.with_name(f".{dest.name}.part")
    with _session().get(url, stream=True, timeout=(5, 30)) as response:
        response.raise_for_status()
        with open(part, "wb") as out:
            for chunk in response.iter_content(chunk_size=CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    os.replace(part, dest)
    digest.hexdigest()
    return size


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> int:
    urls = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    threads = int(sys.argv[3])
    one = fetch_checked if (sys.argv[4] if len(sys.argv) > 4 else "plain") == "integrity" else fetch
    out_dir.mkdir(parents=True, exist_ok=True)
    before = rss_now()
    t0 = time.time()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda iu: one(iu[1], out_dir / f"{iu[0]}.mp4"), enumerate(urls)))
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": sum(sizes),
                "files": len(sizes),
                "rss_before": before,
                "rss_peak": peak,
                "started": t0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
