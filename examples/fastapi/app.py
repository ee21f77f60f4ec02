"""A small FastAPI app: every response says which worker answered it."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from clusterkit import cluster

WORKER_ID = cluster.worker.id if cluster.worker is not None else 0
log = logging.getLogger("fastapi-example")


@asynccontextmanager
async def lifespan(app: FastAPI):
    # serve_asgi sends READY=1 after this has run: a worker is ready once it can serve.
    log.info("worker %s: FastAPI app started, serving", WORKER_ID)
    yield
    log.info("worker %s: FastAPI app stopping", WORKER_ID)


app = FastAPI(lifespan=lifespan)


@app.middleware("http")
async def who_answered(request: Request, call_next):
    response = await call_next(request)
    response.headers["X-Worker"] = str(WORKER_ID)
    response.headers["X-Pid"] = str(os.getpid())
    return response


@app.get("/", response_class=PlainTextResponse)
async def index() -> str:
    return f"hello from FastAPI, worker {WORKER_ID} (pid {os.getpid()})\n"


@app.get("/health")
async def health() -> dict[str, object]:
    return {"status": "ok", "worker": WORKER_ID, "pid": os.getpid()}
