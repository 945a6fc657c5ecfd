"""The HTTP API: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent events or
not), plus /v1/adapters (list, describe, upload) and /v1/stats, on FastAPI.

`model` picks the adapter by its served name (the base answers to its checkpoint's file stem and to "base"). Errors
are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 400 / 401 / 404 / 413 / 503. When an API
key is set every /v1 route needs `Authorization: Bearer KEY` (`require_key`, which the web page's routes use too).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.adapter_format import is_packed, read_adapter
from finetune.atomic import atomic_file
from finetune.errors import FinetuneError, first_line
from finetune.generate import SEED_RANGE, check_utf8
from finetune.templates import ChatTemplate, clean_message
from finetune.serve.config import ServeConfig
from finetune.serve.engine import NAME_RE, Engine, Event, GenerationRequest, ServedAdapter, Usage
from finetune.serve.web import add_web


# ----------------------------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "request_too_large", 503: "overloaded_error"}


# ----------------------------------------------------------------------------------------------------------------------
# Safety: the key and the body cap


def key_matches(key: str | None, authorization: bytes) -> bool:
    """Whether an Authorization header's raw bytes carry `Bearer KEY` (compared in constant time; true when the
    server has no key). Compared as bytes: a key with non-ASCII characters is sent in UTF-8 and HTTP headers are
    bytes (Starlette decodes them as latin-1, which would garble it)."""
    if not key:
        return True
    scheme, _, given = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode())


def require_key(request: Request) -> None:
    """FastAPI dependency: when the server has an API key, the request must carry `Authorization: Bearer KEY`.
    The web page's routes use it too."""
    header = request.headers.get("authorization", "").encode("latin-1")  # the header's own bytes back
    if not key_matches(request.app.state.config.api_key, header):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                       code="invalid_api_key")


def cross_site(headers: dict[bytes, bytes]) -> bool:
    """A browser request sent by another site's page (its Origin is not this server's host). Such a page may send
    a form post or a bodiless POST without the browser asking first, so any state-changing request of this kind is
    refused (uploads, starting and stopping runs); clients that are not browsers send no Origin."""
    origin = headers.get(b"origin")
    if origin is None:
        return False
    return origin.split(b"://", 1)[-1].lower() != headers.get(b"host", b"").lower()


class BodyLimit:
    """ASGI middleware guarding every request with a body: a cross-site browser request is refused (403, see
    `cross_site`), then the body is capped: Content-Length is checked first, then the bytes are counted as they
    arrive (a chunked body has no Content-Length), and the request is answered 413 as soon as the cap is passed.
    Written here because neither Starlette nor uvicorn has a body-size limit. `upload_paths` get the upload cap only
    when uploads are on and the request carries the key: nobody else makes the server hold 256 MiB."""

    def __init__(self, app, config: ServeConfig, upload_paths: tuple[str, ...]) -> None:
        self.app, self.config, self.upload_paths = app, config, upload_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if cross_site(headers):
            response = error_response(403, "cross-site request refused (its Origin is not this server)",
                                      "permission_error", code="cross_site")
            return await response(scope, receive, send)
        upload = (scope["path"] in self.upload_paths and self.config.allow_upload
                  and key_matches(self.config.api_key, headers.get(b"authorization", b"")))
        limit = self.config.max_upload_bytes if upload else self.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._too_large(scope, receive, send, limit)
        # read the whole body (within the cap) before the app sees it, so that an oversized stream is refused
        # cleanly instead of failing half-way through a handler
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await self._too_large(scope, receive, send, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope, receive, send, limit: int) -> None:
        response = error_response(413, f"request body larger than this server's cap of {limit} bytes",
                                  "request_too_large", code="request_too_large")
        await response(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------------------
# Request bodies (pydantic checks types and ranges; a failure is a 400 in OpenAI's shape)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ----------------------------------------------------------------------------------------------------------------------
# Chat rendering


def chat_parts(template: ChatTemplate, messages: list[Message]) -> list[str]:
    """The conversation as text pieces, each tokenized on its own: the pieces of an earlier turn are the same in
    every later request, so their token ids are a prefix of the later request's and the state cache finds them.
    An assistant turn is split as in training (`finetune.prepare`): its prompt ("Assistant:") and its text
    (" answer\\n\\n"). The last piece is the assistant prompt the reply follows."""
    parts = []
    for m in messages:
        text = clean_message(check_utf8(m.text(), f"a {m.role} message"))
        if m.role in ("system", "developer"):
            parts.append(template.system_turn(text))
        elif m.role == "user":
            parts.append(template.user_turn(text))
        else:
            parts.extend(template.assistant_parts(text))
    parts.append(template.assistant_parts("")[0])
    return parts


# ----------------------------------------------------------------------------------------------------------------------
# The app


def _param_from_loc(loc) -> str | None:
    names = [str(x) for x in loc if x not in ("body", "query", "path")]
    return ".".join(names) or None


def create_app(config: ServeConfig, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app serving `config` (an `Engine` is built from it unless one is given; the app closes the engine
    it built at shutdown)."""
    if config.allow_upload and not config.adapters_dir:
        raise FinetuneError("--allow-upload needs --adapters-dir (uploaded adapters are written there)")
    if config.allow_upload and not Path(config.adapters_dir).is_dir():
        raise FinetuneError(f"--adapters-dir {config.adapters_dir}: not a directory (uploaded adapters are written "
                            f"there; create it first)")
    own = engine is None
    engine = Engine(config) if engine is None else engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if own:
            engine.close()

    app = FastAPI(title="rwkv-lora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.engine = engine
    app.add_middleware(BodyLimit, config=config, upload_paths=("/v1/adapters",))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = "no such route" if e.status_code == 404 and e.detail == "Not Found" else str(e.detail)
        return error_response(e.status_code, message, STATUS_TYPES.get(e.status_code, "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc holds the character offset, not a field
            loc = first.get("loc", ())
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            return error_response(400, f"body: not valid JSON{at}")
        param = _param_from_loc(first.get("loc", ()))
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", param=param)

    @app.exception_handler(FinetuneError)
    async def _finetune_error(request: Request, e: FinetuneError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error_response(500, f"internal error: {first_line(e)}", "server_error")

    app.include_router(api_router(), dependencies=[Depends(require_key)])
    add_web(app, config, require_key)  # the web page: its /api routes, then the page itself at / (mounted last)
    return app


def api_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    def models(request: Request):
        engine: Engine = request.app.state.engine
        engine.refresh()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rwkv-lora",
             "kind": "base" if s.adapter is None else s.adapter.kind}
            for name, s in engine.served.items()]}

    @router.get("/adapters")
    def adapters(request: Request):
        engine: Engine = request.app.state.engine
        engine.refresh()
        return {"object": "list", "base": engine.base_name,
                "data": [s.describe() for s in engine.served.values() if s.adapter is not None],
                "skipped": [{"name": n, "reason": r} for n, r in sorted(engine.skipped.items())]}

    @router.get("/adapters/{name}")
    def adapter(name: str, request: Request):
        return _served(request.app.state.engine, name, "name").describe()

    @router.post("/adapters")
    async def upload(request: Request):
        return await _upload(request)

    @router.get("/stats")
    def stats(request: Request):
        return request.app.state.engine.stats()

    @router.post("/completions")
    async def completions(body: CompletionBody, request: Request):
        engine: Engine = request.app.state.engine
        served = _served(engine, body.model, "model")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < engine.vocab_size for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {engine.vocab_size})", param="prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(400, "prompt: give one prompt (a string) per request", param="prompt")
                prompt = prompt[0]
            ids = served.tokenizer.encode(check_utf8(prompt, "the prompt"))
        req = _generation(engine, body, served, ids, body.max_tokens, _stops(body.stop))
        return await _respond(request, req, body, "text_completion")

    @router.post("/chat/completions")
    async def chat(body: ChatBody, request: Request):
        engine: Engine = request.app.state.engine
        served = _served(engine, body.model, "model")
        parts = chat_parts(served.template, body.messages)
        ids = [t for p in parts for t in served.tokenizer.encode(p)]

        def reply_suffix(reply: str) -> str:
            return served.template.assistant_parts(clean_message(reply))[1] if clean_message(reply) else ""

        req = _generation(engine, body, served, ids, body.max_completion_tokens or body.max_tokens,
                          served.template.stops() + _stops(body.stop), reply_suffix)
        return await _respond(request, req, body, "chat.completion")

    return router


def _served(engine: Engine, name: str, param: str) -> ServedAdapter:
    try:
        return engine.resolve(name)
    except KeyError:
        raise APIError(404, f"model {name!r} not found (GET /v1/models lists them)", "not_found_error", param,
                       "model_not_found") from None


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16 or any(len(s) > 256 for s in stops):
        raise APIError(400, "stop: at most 16 strings of at most 256 characters", param="stop")
    return [check_utf8(s, "a stop string") for s in stops if s]


def _generation(engine: Engine, body: _Sampling, served: ServedAdapter, ids: list[int], max_tokens: int | None,
                stop: list[str], reply_suffix=None) -> GenerationRequest:
    config = engine.config
    max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > config.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's cap of {config.max_tokens}",
                       param="max_tokens")
    if not ids:
        raise APIError(400, "the prompt is empty (nothing to condition on)", param="prompt")
    if len(ids) > config.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens, above this server's cap of "
                            f"{config.max_prompt_tokens}", param="prompt")
    return GenerationRequest(served.name, ids, max_tokens, body.temperature, body.top_p, body.top_k,
                             body.presence_penalty, body.frequency_penalty, body.seed, stop, reply_suffix)


async def _respond(request: Request, req: GenerationRequest, body: _Sampling, kind: str):
    engine: Engine = request.app.state.engine
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(event: Event) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        stream = engine.submit(req, on_event)
    except KeyError:
        raise APIError(404, f"model {req.model!r} not found", "not_found_error", "model", "model_not_found") from None
    except OverflowError as e:
        raise APIError(503, f"the server is busy ({e}); retry later", "overloaded_error") from None
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    chat = kind == "chat.completion"

    if not body.stream:
        texts = []
        try:
            while True:
                event = await events.get()
                if event.kind == "text":
                    texts.append(event.text)
                elif event.kind == "error":
                    raise APIError(500 if event.text.startswith("generation failed") else 400, event.text,
                                   "server_error")
                else:
                    break
        finally:
            stream.cancel()  # a no-op when finished; frees the row when the client went away
        text = "".join(texts)
        choice = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice],
                "usage": event.usage.as_dict()}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, usage: Usage | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        out = {"id": rid, "object": chunk_kind, "created": created, "model": req.model, "choices": choices}
        if usage is not None:
            out = {**out, "choices": [], "usage": usage.as_dict()}
        return f"data: {json.dumps(out)}\n\n"

    async def sse() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await events.get()
                if event.kind == "text":
                    yield chunk(event.text, None)
                elif event.kind == "error":
                    err = {"error": {"message": event.text, "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                else:
                    yield chunk(None, event.finish_reason)
                    if include_usage:
                        yield chunk(None, None, usage=event.usage)
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client closed the connection (the task is cancelled) or the stream ended
            stream.cancel()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------------------------------------------------
# Uploads


async def _upload(request: Request) -> dict[str, Any]:
    """POST /v1/adapters: a packed adapter (.safetensors), as multipart (fields `name` and `file`) or as the raw
    body with `?name=`. Validated as merge does (safetensors only, finite, shapes, base fingerprint, family) and by
    this server's rules, then written atomically into adapters_dir and served."""
    engine: Engine = request.app.state.engine
    config = engine.config
    if not config.allow_upload:
        raise APIError(403, "uploads are off on this server (start it with --allow-upload)", "permission_error")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4, max_part_size=config.max_upload_bytes)
        name, file = form.get("name"), form.get("file")
        if not isinstance(name, str) or file is None or isinstance(file, str):
            raise APIError(400, "upload: send the fields 'name' (text) and 'file' (the packed .safetensors)",
                           param="file")
        data = await file.read()
    else:
        name = request.query_params.get("name")
        data = await request.body()
    if not isinstance(name, str) or not NAME_RE.match(name) or name.endswith(".safetensors"):
        raise APIError(400, f"name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, not starting with "
                            f"'.' or '-'; without .safetensors)", param="name")
    if name in engine.served or name == "base":
        raise APIError(409, f"name {name!r} is already served", "conflict_error", "name")
    target = Path(config.adapters_dir) / f"{name}.safetensors"
    if target.exists():
        raise APIError(409, f"name {name!r}: {target.name} already exists in the adapters directory",
                       "conflict_error", "name")
    # check it from a private temporary file first: nothing unchecked ever lands in adapters_dir
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=config.adapters_dir) as tmp:
        path = Path(tmp) / f"{name}.safetensors"
        path.write_bytes(data)
        if not is_packed(path):
            raise APIError(400, "upload: not a packed rwkv-lora adapter (a .safetensors file from `rwkv-lora "
                                "pack`); pickles are never loaded", param="file")
        try:
            adapter = read_adapter(path)
            engine.check(adapter)
        except FinetuneError as e:
            raise APIError(400, f"upload refused: {str(e).replace(str(path), name)}", param="file") from None
        with atomic_file(target) as out:
            os.replace(path, out)
    try:
        served = engine.add_adapter(name, str(target))
    except BaseException as e:  # whatever went wrong, nothing refused stays in adapters_dir
        target.unlink(missing_ok=True)
        if isinstance(e, FinetuneError):
            raise APIError(400, f"upload refused: {e}", param="file") from None
        raise
    return served.describe()
