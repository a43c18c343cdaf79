"""Starting and stopping the Serve app from honed's own commands (`honed serve`, `honed demo`)."""

from __future__ import annotations

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
    from ray import serve

    url = start(cfg)
    print(f"[honed.serve] OpenAI-compatible endpoint at {url} — models: "
          f"{', '.join([cfg.base_name, *cfg.adapters])}", flush=True)
    if detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def stop() -> None:
    from ray import serve

    serve.shutdown()
