"""`nmt serve`: a trained model behind an HTTP API (FastAPI on uvicorn).

    POST /translate   {"text": ["...", ...], "beam_size": 5, ...}
                      -> {"translations": [...], "model": ..., "took_ms": ...}
    GET  /health      {"status": "ok", ...}; 503 once the decoding worker has stopped
    GET  /info        model, languages, recipe, scores, decoding defaults, limits
    GET  /openapi.json, /docs

Concurrent requests are decoded together by a `DynamicBatcher` (one worker thread);
requests with different search options never share a batch. Input beyond the limits
is refused before it reaches the model: too many sentences, too long a sentence or too
large a body is a 413, anything malformed (bad JSON, wrong types, unknown or
out-of-range options) a 422, both with a JSON body `{"detail": ...}`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import copy
import re
import signal
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from nmt.batcher import DynamicBatcher
from nmt.translate import SearchOptions, Translator

log = logging.getLogger("nmt.serve")

# Per-request bounds on the search options: a request must not buy unbounded work.
MAX_BEAM = 32
MAX_LEN_RATIO = 10.0


@dataclass(frozen=True)
class ServeLimits:
    max_sentences: int = 100  # sentences per request
    max_chars: int = 1000  # characters (code points) per sentence
    max_batch: int = 64  # sentences per decoding batch
    max_wait_ms: float = 10.0  # longest wait for a batch to fill

    def __post_init__(self):
        for name in ("max_sentences", "max_chars", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body that can hold max_sentences of max_chars: 12 bytes per
        character covers JSON's \\u escapes of surrogate pairs, plus room for options."""
        return 16384 + self.max_sentences * (12 * self.max_chars + 8)


class TranslateRequest(BaseModel):
    # Strict types (no "3" for 3, no true for 1), finite numbers, no unknown keys.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    text: list[str] = Field(..., description="sentences to translate; one translation each, in order")
    beam_size: Optional[int] = Field(None, ge=1, le=MAX_BEAM, description="beam size, 1 = greedy [default: the model's recipe]")
    length_penalty: Optional[float] = Field(None, ge=0.0, le=10.0, description="GNMT alpha [default: recipe]")
    max_len_ratio: Optional[float] = Field(
        None, ge=0.0, le=MAX_LEN_RATIO,
        description="output length limit = ratio x source length + recipe's max_len_b [default: recipe]",
    )
    nbest: int = Field(1, ge=1, le=MAX_BEAM, description="hypotheses per sentence in `nbest` (raises the beam to at least this)")


class Candidate(BaseModel):
    translation: str
    score: float = Field(..., description="length-penalised log-probability")


class TranslateResponse(BaseModel):
    translations: list[str]
    nbest: Optional[list[list[Candidate]]] = Field(None, description="with nbest > 1: the n best per sentence, best first")
    model: str
    took_ms: float


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 before the app sees it.

    The body is read here (declared length or not) and replayed to the app.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body over the limit of {self.max_bytes} bytes"}, status_code=413)
        await response(scope, receive, send)


def _replay(messages: list[dict], then=None):
    async def receive():
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def model_info(loaded, translator: Translator, limits: ServeLimits) -> dict:
    """What GET /info answers: the model, its languages and recipe, its scores, the settings."""
    recipe = loaded.recipe
    payload = loaded.payload or {}
    path = Path(loaded.path) if loaded.path is not None else None
    return _json_safe({
        "model": str(path) if path is not None else None,
        "name": recipe.name,
        "src_lang": recipe.data.src_lang,
        "trg_lang": recipe.data.trg_lang,
        "step": payload.get("step"),
        "scores": {"validation": payload.get("metrics") or {}, "test": _test_scores(path, payload, translator.opts)},
        "max_src_len": translator.max_src_len,
        "decode": {k: v for k, v in asdict(translator.opts).items() if k not in ("nbest", "batch_size")},
        "limits": {**asdict(limits), "max_body_bytes": limits.max_body_bytes, "max_beam": MAX_BEAM},
        "versions": payload.get("versions", {}),
        "recipe": recipe.to_dict(),
    })


def _json_safe(value):
    """`value` with NaN and infinities (a diverged run's validation loss) as None: JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _test_scores(path: Path | None, payload: dict, opts: SearchOptions) -> list:
    """Test scores that `nmt evaluate` wrote for this checkpoint alone with the settings the
    server decodes with, if any (:func:`nmt.evaluate.scores_of`); for an exported folder,
    those it was exported with (its model card's)."""
    from nmt.evaluate import decode_settings, scores_of
    from nmt.runs import run_dir_of

    if path is None:
        return []
    if path.is_dir():
        decode = decode_settings(opts)
        return [e for e in payload.get("test_scores") or [] if isinstance(e, dict) and e.get("decode") == decode]
    return scores_of(run_dir_of(path) / "eval" / "report.json", path, opts)


def create_app(loaded, limits: ServeLimits = ServeLimits(), device="cpu") -> FastAPI:
    """The API for one loaded model (an `nmt.checkpoint.LoadedModel`).

    The decoding worker starts with the app's lifespan and stops with it (in-flight
    requests are finished first).
    """
    defaults = SearchOptions.from_recipe(loaded.recipe.decode, batch_size=limits.max_batch)
    translator = Translator(loaded, defaults, device, warn=lambda msg: log.warning("batch %s", msg))
    info = model_info(loaded, translator, limits)
    model_name = info["model"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = DynamicBatcher(
            lambda lines, opts: translator.translate(lines, opts=opts),
            max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms,
        )
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.batcher.close)

    app = FastAPI(
        title="nmt",
        summary="Neural machine translation: GRU encoder-decoder with Bahdanau attention",
        description=f"Translates {info['src_lang']} to {info['trg_lang']} with {model_name}.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        # FastAPI's own handler echoes each bad input back, which can be a megabyte of
        # text, or a NaN that JSON cannot encode; the type, place and message suffice.
        errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": _message(e)} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/translate", response_model=TranslateResponse, response_model_exclude_none=True, responses={
        413: {"description": "too many sentences, a sentence too long, or a body too large"},
        503: {"description": "the server is shutting down"},
    })
    async def translate(request: TranslateRequest) -> TranslateResponse:
        """Translate sentences; concurrent requests are decoded together in batches."""
        start = time.perf_counter()
        check_limits(request.text, limits)
        opts = request_options(defaults, request)
        if request.text:
            try:
                future = app.state.batcher.submit([clean_text(t) for t in request.text], opts)
            except RuntimeError:
                raise HTTPException(503, "the server is shutting down") from None
            try:
                results = await asyncio.wrap_future(future)
            except Exception as e:
                raise HTTPException(500, f"translation failed: {type(e).__name__}: {e}") from None
        else:
            results = []
        nbest = None
        if request.nbest > 1:
            nbest = [[Candidate(translation=text, score=hyp.score) for text, hyp in r] for r in results]
        return TranslateResponse(
            translations=[r[0][0] for r in results],
            nbest=nbest,
            model=model_name,
            took_ms=round((time.perf_counter() - start) * 1000, 3),
        )

    @app.get("/health")
    async def health():
        """Liveness: 200 while the decoding worker runs, 503 otherwise."""
        batcher = getattr(app.state, "batcher", None)
        if batcher is None or not batcher.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": model_name, "served": asdict(batcher.stats)}

    @app.get("/info")
    async def get_info():
        """The model, its languages, recipe and scores, the decoding defaults and the limits."""
        return info

    return app


def _message(error: dict) -> str:
    reason = error.get("ctx", {}).get("error") if error["type"] == "json_invalid" else None
    return f"{error['msg']}: {reason}" if isinstance(reason, str) else error["msg"]


def check_limits(text: list[str], limits: ServeLimits) -> None:
    if len(text) > limits.max_sentences:
        raise HTTPException(413, f"{len(text)} sentences, over the limit of {limits.max_sentences} per request")
    for i, sentence in enumerate(text):
        if len(sentence) > limits.max_chars:
            raise HTTPException(
                413, f"text[{i}]: {len(sentence)} characters, over the limit of {limits.max_chars} per sentence"
            )


def request_options(defaults: SearchOptions, request: TranslateRequest) -> SearchOptions:
    """The search options of one request: the model's defaults with its overrides.

    Equal options compare equal, so the batcher groups requests by them.
    """
    overrides = {
        "beam_size": request.beam_size,
        "length_penalty": request.length_penalty,
        "max_len_a": request.max_len_ratio,
        "nbest": request.nbest,
    }
    opts = replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
    return replace(opts, beam_size=max(opts.beam_size, opts.nbest))


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(sentence: str) -> str:
    """What a JSON string can hold that a text file cannot: lone UTF-16 surrogates become
    U+FFFD and NUL characters go, as `nmt translate` does with invalid UTF-8 and NUL bytes."""
    return _SURROGATE.sub("\ufffd", sentence).replace("\x00", "")


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a port in use is a clean error before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(model_path, *, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits = ServeLimits(),
          device="cpu") -> None:
    """Load a model and serve it until interrupted (Ctrl-C or SIGTERM stop it gracefully).

    Raises KeyboardInterrupt after a graceful stop on Ctrl-C.
    """
    import uvicorn

    from nmt.checkpoint import load_model
    from nmt.runs import resolve_model

    sock = listen(host, port)
    try:
        loaded = load_model(resolve_model(model_path), device)
        app = create_app(loaded, limits, device)
        config = uvicorn.Config(app, log_config=_log_config(), timeout_graceful_shutdown=30)
        shown = f"[{host}]" if ":" in host else host
        log.info("model: %s", loaded.path)
        log.info("serving on http://%s:%d (max %d sentences per batch, %g ms wait)",
                 shown, sock.getsockname()[1], limits.max_batch, limits.max_wait_ms)
        server = uvicorn.Server(config)
        stopped_by = []  # the signals that stopped the server
        handle_exit = server.handle_exit

        def record(sig, frame):
            stopped_by.append(sig)
            handle_exit(sig, frame)

        server.handle_exit = record  # uvicorn installs server.handle_exit for SIGINT and SIGTERM
        server.run(sockets=[sock])
        # uvicorn raises the signal again once it has shut down, and a SIGINT becomes a
        # KeyboardInterrupt, unless the process was started with SIGINT ignored (a
        # background job of a shell script): Ctrl-C ends with the same exit either way.
        if signal.SIGINT in stopped_by:
            raise KeyboardInterrupt
    finally:
        sock.close()


def _log_config() -> dict:
    """uvicorn's logging, with the access log on stderr too (stdout is for data) and
    this module's messages (model, truncated inputs, failed batches) in the same format."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["nmt.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
