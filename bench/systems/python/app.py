"""The hello world served by the Python systems: same status and body as the seed's Node server."""

BODY = b"hello world\n"


def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Length", str(len(BODY)))])
    return [BODY]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"12")]}
    )
    await send({"type": "http.response.body", "body": BODY})
