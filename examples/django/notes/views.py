"""``GET /``: hello; ``POST /notes`` (form field ``text``) writes a row; ``GET /notes``
reads them all."""

import logging
import os

from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse

from notes.middleware import WORKER_ID
from notes.models import Note

log = logging.getLogger("notes")


def index(request):
    return HttpResponse(f"hello from Django, worker {WORKER_ID} (pid {os.getpid()})\n")


def notes(request):
    if request.method == "POST":
        text = request.POST.get("text", "")[:200]
        note = Note.objects.create(text=text, worker=WORKER_ID)
        log.info("worker %s: wrote note %s", WORKER_ID, note.id)
        return JsonResponse({"id": note.id, "text": note.text, "worker": WORKER_ID}, status=201)
    if request.method == "GET":
        rows = Note.objects.order_by("id").values("id", "text", "worker")
        return JsonResponse({"worker": WORKER_ID, "notes": list(rows)})
    return HttpResponseNotAllowed(["GET", "POST"])
