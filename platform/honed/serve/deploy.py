"""Starting and stopping the Serve app from honed's own commands (`honed serve`, `honed demo`)."""

from __future__ import annotations

import signal
import time

from honed.config import ServeConfig

APP_NAME = "honed"


def start(cfg: ServeConfig) -> str:
    """Deploy the app on the connected Ray cluster and return its base URL once it answers."""
    from ray import serve

    from honed.serve.app import build_app

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg.model_dump()), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}/v1"


def serve_forever(cfg: ServeConfig, detach: bool = False) -> None:
    """Deploy, then block until Ctrl-C or SIGTERM (how Kubernetes stops a pod) and shut Serve down cleanly."""
    from ray import serve

    # After ray.init: Ray's own SIGTERM handler dumps a native stack trace and aborts (exit -6).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = start(cfg)
        print(f"[honed.serve] OpenAI-compatible endpoint at {url} — models: "
              f"{', '.join([cfg.base_name, *cfg.adapters])}", flush=True)
        while not detach:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        print("[honed.serve] stopping: draining requests and shutting Serve down", flush=True)
        serve.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop() -> None:
    from ray import serve

    serve.shutdown()
