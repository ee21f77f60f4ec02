"""A small Flask app: every response says which worker answered it."""

from __future__ import annotations

import logging
import os

from flask import Flask, jsonify

from clusterkit import cluster

WORKER_ID = cluster.worker.id if cluster.worker is not None else 0
log = logging.getLogger("flask-example")

app = Flask(__name__)


@app.after_request
def who_answered(response):
    response.headers["X-Worker"] = str(WORKER_ID)
    response.headers["X-Pid"] = str(os.getpid())
    return response


@app.get("/")
def index():
    return f"hello from Flask, worker {WORKER_ID} (pid {os.getpid()})\n"


@app.get("/health")
def health():
    return jsonify(status="ok", worker=WORKER_ID, pid=os.getpid())
