"""The Flask app of the web UI / JSON API (resnet_slim/serve.py runs it on waitress): the page,
`POST /predict` and `/healthz`.

Uploads stay in memory (never written to disk), are size-checked before they are read and
pixel-checked before they are decoded (decompression bombs), then go through
`data.preprocess_image`, the pipeline's own test transform. At most `max_decodes` images are
decoded at once; a request that waits DECODE_WAIT_S for a decoding slot gets HTTP 503.
"""

import io
import threading
import time

import numpy as np
from flask import Flask, Request, jsonify, render_template, request
from PIL import Image, UnidentifiedImageError
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, ServiceUnavailable

from resnet_slim.data import loader as data
from resnet_slim.serve_release import Release

DEFAULT_MAX_UPLOAD_MB = 5.0  # request body limit; a larger upload gets HTTP 413
DEFAULT_MAX_MEGAPIXELS = 25.0  # width x height limit, checked from the header before decoding
DEFAULT_MAX_DECODES = 2  # uploads decoded at once (the memory bound; see the module docstring)
# multipart parts in one upload: the page sends one, API clients may add a few (werkzeug: 1000)
MAX_FORM_PARTS = 100
DECODE_WAIT_S = 20  # longest wait for a decoding slot before answering 503
TOP_K = 3
# The formats prepare reads from an imagefolder (data.decode.IMAGE_SUFFIXES). Pillow's rarer
# decoders (EPS runs Ghostscript, for one) never see an upload.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# Page resources come from this server only (the page works offline); previews are blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def decode_upload(payload: bytes, *, max_pixels: int) -> Image.Image:
    """The uploaded bytes as a decoded PIL image, or BadRequest with one clear line."""
    if not payload:
        raise BadRequest("empty upload: the file has 0 bytes")
    formats = ", ".join(UPLOAD_FORMATS)
    try:
        image = Image.open(io.BytesIO(payload), formats=UPLOAD_FORMATS)  # reads the header only
    except Image.DecompressionBombError as err:
        raise BadRequest(f"image refused as a decompression bomb: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(f"not a recognised image: upload one of {formats}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadRequest(
            f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over "
            f"the {max_pixels / 1e6:g} megapixel limit (decompression bomb guard)"
        )
    try:
        image.load()
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise BadRequest(f"corrupt {image.format} image: {detail}") from None
    return image


def predict(release: Release, image: Image.Image) -> dict:
    """Top-k classes with probabilities, and the time onnxruntime took for this one image."""
    try:
        batch = data.preprocess_image(image, release.meta)
    except (OSError, ValueError) as err:  # e.g. a pixel mode Pillow cannot convert to RGB
        raise BadRequest(f"cannot convert this {image.mode} image to RGB: {err}") from None
    start = time.perf_counter()
    logits = release.session.run(None, {release.input_name: batch})[0][0].astype(np.float64)
    inference_ms = (time.perf_counter() - start) * 1000.0
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top = np.argsort(-probabilities, kind="stable")[:TOP_K]
    names = release.meta["class_names"]
    return {
        "predictions": [
            {"class": str(names[i]), "index": int(i), "probability": float(probabilities[i])}
            for i in top
        ],
        "inference_ms": inference_ms,
    }


class InMemoryRequest(Request):
    """Keeps uploaded files in memory: werkzeug would spool those over 500 KB to a temp file.

    MAX_CONTENT_LENGTH bounds the memory one request can take.
    """

    def _get_file_stream(
        self, total_content_length, content_type, filename=None, content_length=None
    ):
        return io.BytesIO()


def too_large(content_length: int | None, max_upload_bytes: int, max_upload_mb: float) -> str:
    """What a 413 means: werkzeug raises the same error for a body over the size limit and for a
    form with more than MAX_FORM_PARTS parts; the body's length tells them apart."""
    if content_length is not None and content_length <= max_upload_bytes:
        return (
            f"too many form fields: at most {MAX_FORM_PARTS}; send the image alone, "
            f"in the field 'image'"
        )
    return f"upload is larger than the {max_upload_mb:g} MB limit"


def create_app(
    release: Release,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    max_decodes: int = DEFAULT_MAX_DECODES,
) -> Flask:
    """The Flask app: `/` (the page), `POST /predict` (JSON), `/healthz`."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    max_upload_bytes = int(max_upload_mb * 1024 * 1024)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    # A text field may be as large as the body, like the file (werkzeug: 500 KB): then a 413 for
    # a body within the size limit can only mean too many parts, and the answer says so.
    app.config["MAX_FORM_MEMORY_SIZE"] = max_upload_bytes
    max_pixels = int(max_megapixels * 1e6)
    decoding = threading.BoundedSemaphore(max_decodes)

    @app.get("/")
    def index():
        return render_template(
            "index.html",
            card=release.card,
            max_upload_mb=max_upload_mb,
            max_upload_bytes=max_upload_bytes,
            formats=UPLOAD_FORMATS,
        )

    @app.post("/predict")
    def predict_upload():
        answer = answer_upload(release, decoding, max_decodes=max_decodes, max_pixels=max_pixels)
        return jsonify(answer)

    @app.get("/healthz")
    def healthz():
        return jsonify(
            {"status": "ok", "model": release.card["name"], "gated": release.card["gated"]}
        )

    add_error_handling(app, max_upload_bytes=max_upload_bytes, max_upload_mb=max_upload_mb)
    return app


def answer_upload(
    release: Release, decoding: threading.BoundedSemaphore, *, max_decodes: int, max_pixels: int
) -> dict:
    """`POST /predict`'s answer for the uploaded image: decoded while holding one of the
    `max_decodes` slots (the memory bound; 503 after DECODE_WAIT_S without one), then classified."""
    upload = request.files.get("image")  # parsing the body enforces MAX_CONTENT_LENGTH (413)
    if upload is None:
        raise BadRequest(
            "no file uploaded: send multipart/form-data with the image in the field 'image'"
        )
    payload = upload.read()
    if not decoding.acquire(timeout=DECODE_WAIT_S):
        raise ServiceUnavailable(f"busy: {max_decodes} images are being decoded; retry shortly")
    try:  # the decoded image (up to ~100 MB) lives only inside this block
        image = decode_upload(payload, max_pixels=max_pixels)
        info = {"width": image.width, "height": image.height, "format": image.format}
        result = predict(release, image)
        image.close()
    finally:
        decoding.release()
    return {**result, "image": info, "model": release.card}


def add_error_handling(app: Flask, *, max_upload_bytes: int, max_upload_mb: float) -> None:
    """Every error as one JSON line (for scripts and the page's script to show), and the security
    headers on every answer."""

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        message = err.description
        if isinstance(err, RequestEntityTooLarge):
            message = too_large(request.content_length, max_upload_bytes, max_upload_mb)
        return jsonify({"error": message}), err.code

    @app.after_request
    def security_headers(response):
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
