#!/usr/bin/env python3
"""A backend for tests/gateway.rs, standard library only: HTTP/1.1 with
keep-alive on 127.0.0.1:PORT (argv[1]), answering

  GET  /             a page (NAME, argv[2]) with a script and an image
  GET  /app.js       the script: sets the title, then echoes a WebSocket
  GET  /pixel.png    an image
  GET  /bytes?n=N    N bytes of a fixed pattern (for a sha256 at the client)
  POST /sha256       the sha256 of the body (Content-Length or chunked)
  GET  /stream       five chunks, 300 ms apart (chunked)
  GET  /echo-headers the request line and headers, as text
  GET  /ws           a WebSocket that echoes each text message, prefixed

and a header X-Backend-Conn with the peer port of the connection, so a
test can tell a kept connection from a new one.
"""
import base64
import hashlib
import http.server
import struct
import sys
import time

NAME = sys.argv[2] if len(sys.argv) > 2 else "backend"
PATTERN = bytes(range(256)) * 256  # 64 KiB

PAGE = f"""<!doctype html><html><head><title>loading</title>
<script src="app.js"></script></head>
<body><h1>{NAME}</h1><img id="pixel" src="pixel.png"></body></html>"""

SCRIPT = """
window.addEventListener('load', () => {
  const img = document.getElementById('pixel');
  document.title = 'loaded ' + (img.complete && img.naturalWidth > 0 ? 'with image' : 'without image');
  const url = new URL('ws', location.href);
  url.protocol = 'ws:';
  const ws = new WebSocket(url);
  window.echoes = [];
  ws.onopen = () => { ws.send('one'); ws.send('two'); };
  ws.onmessage = (e) => { window.echoes.push(e.data); };
  ws.onerror = () => { window.echoes.push('error'); };
});
"""

# A 1x1 PNG.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend-Conn", str(self.client_address[1]))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/":
            self.send(200, PAGE.encode(), "text/html")
        elif path == "/app.js":
            self.send(200, SCRIPT.encode(), "application/javascript")
        elif path == "/pixel.png":
            self.send(200, PIXEL, "image/png")
        elif path == "/bytes":
            n = int(query.partition("=")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("X-Backend-Conn", str(self.client_address[1]))
            self.end_headers()
            while n > 0:
                chunk = PATTERN[: min(n, len(PATTERN))]
                self.wfile.write(chunk)
                n -= len(chunk)
        elif path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                line = f"chunk {i} at {time.monotonic():.3f}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/echo-headers":
            text = self.requestline + "\n" + "".join(f"{k}: {v}\n" for k, v in self.headers.items())
            self.send(200, text.encode())
        elif path == "/ws":
            self.websocket()
        else:
            self.send(404, b"not here\n")

    def do_POST(self):
        digest = hashlib.sha256()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    digest.update(data)
                    left -= len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                left -= len(data)
        self.send(200, digest.hexdigest().encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            if opcode == 1:
                reply = f"{NAME} echoes {data.decode()}".encode()
                self.wfile.write(bytes([0x81, len(reply)]) + reply)
                self.wfile.flush()


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
