"""A local S3-compatible server for tests: moto on 127.0.0.1, which boto3 and pyarrow reach through
AWS_ENDPOINT_URL_S3.

    from s3_server import BUCKET, moto_s3     # tests/ is on sys.path (its conftest.py sits there)
    with moto_s3() as env:                     # env: the variables to give Ray nodes and subprocesses too
        write_text(f"s3://{BUCKET}/x.txt", "...")
"""

from __future__ import annotations

import contextlib
import logging
import os

BUCKET = "honed-store"


@contextlib.contextmanager
def moto_s3():
    """moto's S3 server on 127.0.0.1 with the bucket BUCKET; yields the env that points clients at it (set in
    os.environ for the duration)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


