"""``genq dashboard``: a web page of every job, its life and its pictures, live (see docs/dashboard.md).

It reads the ledger and its event stream only (and, for queue depths, the reader ``genq metrics`` uses);
its two writes are the producer's own cancel and resubmit. Modules: :mod:`~genq.dashboard.queries`
(read-only ledger queries, redaction), :mod:`~genq.dashboard.plots` (SVG), :mod:`~genq.dashboard.app`
(the aiohttp app, its lock-down and the live stream); the page itself is ``static/`` (no build step, no
CDN: every asset is served from the package)."""
