"""``python -m bench.serve APP PORT HTTP LOOP TIMEOUT``: serve a bench app under uvicorn on 127.0.0.1.

The process exits by itself after TIMEOUT seconds, so a stuck benchmark never leaves it behind.
"""

from __future__ import annotations

import os
import sys
import threading


def main() -> None:
    app_name, port, http, loop, timeout = sys.argv[1:6]
    threading.Timer(float(timeout), lambda: os._exit(3)).start()
    import uvicorn

    from . import apps

    app = getattr(apps, app_name)()
    uvicorn.run(app, host="127.0.0.1", port=int(port), http=http, loop=loop, log_level="warning",
                access_log=False, backlog=4096, timeout_keep_alive=30, timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
