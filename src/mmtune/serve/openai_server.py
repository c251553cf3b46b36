"""`mmtune serve MODEL_DIR`: an OpenAI-compatible chat server for a tuned model.

Endpoints (the subset of the OpenAI REST API that chat clients use):

- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
- ``POST /v1/chat/completions``: a reply to ``messages``, whole or streamed as server-sent
  events in the ``chat.completion.chunk`` format ending with ``data: [DONE]``
  (https://platform.openai.com/docs/api-reference/chat-streaming). Content parts ``text``,
  ``image_url`` (a ``data:image/...;base64,`` URL: the server never fetches URLs) and
  ``input_audio`` (base64 ``wav``/``mp3``) are accepted when the model has the encoder for them.
- ``GET /health``: ``{"status": "ok"}`` once the model is loaded.

Every error is a 4xx/5xx status with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 404 ``model_not_found`` for another model
id, 400 ``invalid_request_error`` for malformed JSON, missing or mistyped fields, a bad role, an
unsupported content part or a last message that alone is over the limit
(``context_length_exceeded``; earlier turns are left out first, as in ``mmtune chat``), 413 for a
body over ``max_request_bytes``, 401 for a wrong API key when one is set.

Defaults follow OpenAI's (``temperature`` 1, ``top_p`` 1); ``max_tokens`` defaults to
``default_max_tokens`` and is cut to what fits in the model's context.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
# (``request: Request`` with ``Request`` imported inside create_app).

import argparse
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.content import content_text, parse_content
from ..errors import DataError, MMTuneError
from ..inference.models import ChatModel, load_chat_model
from ..inference.session import respond
from ..inference.turns import ENCODER_NAMES, GenerationSettings, InputError, Turn
from ..multimodal.data import Media
from . import require

#: Request bodies above this size get a 413 before they are parsed (base64 images are large).
MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: Decoded size limit of one image or audio content part.
MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_TOKENS = 512


# ---------------------------------------------------------------------------------------------
# Request schema (strict: "0.5" is not a number, 2.0 is not an integer, "yes" is not a boolean)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None  # parts: mmtune.data.content.parse_content
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The fields of https://platform.openai.com/docs/api-reference/chat/create this server
    honours. Others are ignored, except those whose meaning it cannot honour (``n`` > 1,
    ``tools``, ``logprobs``), which are refused."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    logprobs: bool | None = None


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param(loc) -> str | None:
    """pydantic location -> OpenAI's param: ('messages', 0, 'role') -> 'messages[0].role'.

    pydantic adds the union branch to the location ('str', 'list[...]') and, for a tagged
    union, the tag after the list index ('image_url'); neither is a field name."""
    out, skip_tag = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if skip_tag:
            skip_tag = False
            continue
        if "[" in part or part in ("str", "int", "float", "bool"):
            skip_tag = "tagged-union" in part
            continue
        out += f".{part}" if out else part
    return out or None


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def validation_error(err: ValidationError) -> APIError:
    """The deepest problem of a failed request validation, worded as OpenAI words them. A
    value that fits no branch of a union gets the branches' messages joined with 'or'."""
    errors = err.errors()
    if errors[0]["type"] == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    by_param: dict[str | None, list[dict]] = {}
    for e in errors:
        by_param.setdefault(_param(e["loc"]), []).append(e)
    param = max(by_param, key=lambda p: len(p or ""))
    group = by_param[param]
    if any(e["type"] == "missing" for e in group):
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    msg = " or ".join(dict.fromkeys(e["msg"] for e in group))
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value for {where}: {msg} (got {_shown(group[0].get('input'))}).", param,
                    "invalid_value")


# ---------------------------------------------------------------------------------------------
# Content parts -> turns

#: Error codes of the content parser's reasons (mmtune.data.content).
_PART_CODES = {"bad_data_url": "invalid_base64"}


def to_turns(messages: list[Message], model: ChatModel) -> list[Turn]:
    """Request messages -> turns. Content parts go through the data layer's parser
    (:func:`mmtune.data.content.parse_content`); images and audio must be inline (a
    ``data:`` URL or base64 ``input_audio.data``): this server never fetches URLs or reads files."""
    turns = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None:
            raise APIError(400, f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content",
                           "missing_required_parameter")
        try:
            parts = parse_content(msg.content, f"messages[{i}].content")
        except DataError as e:
            raise APIError(400, f"Invalid value for '{e.field}': {e.problem}.", e.field,
                           _PART_CODES.get(e.reason, "invalid_value")) from None
        turn = Turn(role, content_text(parts))
        for part in parts:
            if part.kind == "text":
                continue
            if role != "user":
                raise APIError(400, f"'{part.where}': {part.kind} content is only allowed in user messages.",
                               part.where, "invalid_content_part")
            if part.kind not in model.modalities:
                raise APIError(400, f"Model '{model.name}' has no {ENCODER_NAMES[part.kind]}: it cannot take "
                               f"{part.kind} content ('{part.where}'). Send text only, or serve a composed "
                               f"multimodal model with a {ENCODER_NAMES[part.kind]}.", part.where,
                               f"unsupported_{part.kind}")
            if part.data is None:
                raise APIError(400, f"'{part.field}' must be a data URL (data:image/png;base64,...) or base64 data: "
                               "this server does not fetch URLs or read files.", part.field, f"invalid_{part.kind}_url"
                               if part.kind == "image" else "invalid_audio")
            if len(part.data) > MAX_ATTACHMENT_BYTES:
                raise APIError(400, f"The {part.kind} at '{part.field}' is over {MAX_ATTACHMENT_BYTES // 2**20} MiB.",
                               part.field, "attachment_too_large")
            if part.kind == "audio" and part.format not in (None, "wav", "mp3"):
                raise APIError(400, f"Invalid value for '{part.where}.input_audio.format': 'wav' or 'mp3' (got "
                               f"{part.format!r}).", f"{part.where}.input_audio.format", "invalid_value")
            (turn.images if part.kind == "image" else turn.audios).append(
                Media(part.kind, data=part.data, field=part.field))
        turns.append(turn)
    return turns


def settings_from(req: ChatCompletionRequest, default_max_tokens: int) -> GenerationSettings:
    if req.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", "n", "unsupported_value")
    if req.tools:
        raise APIError(400, "Tool calling is not supported by this server.", "tools", "unsupported_value")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server.", "logprobs", "unsupported_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "'stop' takes up to 4 non-empty strings.", "stop", "invalid_value")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    return GenerationSettings(max_new_tokens=max_tokens,
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(stop))


# ---------------------------------------------------------------------------------------------
# The app


def create_app(model: ChatModel, model_name: str | None = None, *, api_key: str | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, max_request_bytes: int = MAX_REQUEST_BYTES):
    """A FastAPI app serving ``model`` under the id ``model_name`` (default: ``model.name``).

    ``api_key``: when set, requests must send ``Authorization: Bearer <api_key>``.
    Every request is answered by a :class:`~mmtune.inference.session.ChatSession` over its
    messages, so a conversation longer than the context follows the same policy as ``mmtune
    chat`` and the web UI (:mod:`mmtune.inference.context`): the oldest exchanges are left out
    (said in the reply's ``mmtune.notes`` and ``mmtune.dropped_messages``), and a last message
    that alone is over the limit (``model.max_prompt_tokens`` and the context) is refused with
    ``context_length_exceeded``.
    """

    require("fastapi", "mmtune serve")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    model_name = model_name or model.name
    created = int(time.time())
    app = FastAPI(title="mmtune OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = {404: f"Unknown path {request.url.path}: this server has /v1/models and /v1/chat/completions.",
               405: f"Method {request.method} is not allowed on {request.url.path}."}.get(exc.status_code, exc.detail)
        return JSONResponse(APIError(exc.status_code, msg, code=None).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        err = APIError(500, f"The server failed on this request: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def _model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mmtune",
                "modalities": sorted(model.modalities), "context_length": model.context_length}

    def _auth(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models(request: Request):
        _auth(request)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        _auth(request)
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist: this server serves '{model_name}'.",
                           "model", "model_not_found")
        return _model_card()

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise APIError(413, f"The request body is {int(declared)} bytes, over the limit of {max_request_bytes}.",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise APIError(413, f"The request body is over the limit of {max_request_bytes} bytes.",
                               code="request_too_large")
        return bytes(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _auth(request)
        raw = await _read_body(request)
        try:
            req = ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist: this server serves '{model_name}'.",
                           "model", "model_not_found")
        settings = settings_from(req, default_max_tokens)
        try:
            turns = await run_in_threadpool(to_turns, req.messages, model)
            reply = await run_in_threadpool(respond, model, turns, settings, True)
        except InputError as e:
            raise APIError(400, str(e), e.param, e.code) from None
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def extension() -> dict:
            """mmtune's own fields of a response: the adapter that answered, notes, dropped turns."""
            return {"route": reply.route, "notes": reply.notes, "dropped_messages": reply.dropped}

        def usage() -> dict:
            return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens}

        if not req.stream:
            try:
                text = await run_in_threadpool(reply.text)
            finally:
                await run_in_threadpool(reply.close)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reply.finish_reason, "logprobs": None}],
                    "usage": usage(), "mmtune": extension()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None, with_usage: bool = False) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if with_usage:
                body["choices"], body["usage"] = [], usage()
            elif include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            pieces = iter(reply)
            end = object()
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    piece = await run_in_threadpool(next, pieces, end)
                    if piece is end:
                        break
                    yield chunk({"content": piece})
                yield chunk({}, reply.finish_reason)
                if include_usage:
                    yield chunk({}, with_usage=True)
            except MMTuneError as e:  # failed after the stream started: report it in the stream
                yield f"data: {json.dumps(APIError(500, str(e), type='server_error').body())}\n\n"
            finally:
                await run_in_threadpool(reply.close)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---------------------------------------------------------------------------------------------
# Running it


def serve(model_dir: str, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000, *,
          template: str = "auto", model_name: str | None = None, max_prompt_tokens: int | None = None,
          api_key: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS, log=print) -> None:
    """Load the model and serve it until interrupted (uvicorn)."""
    uvicorn = require("uvicorn", "mmtune serve")

    log(f"loading {model_dir}" + (f" with adapter {adapter}" if adapter else ""))

    model = load_chat_model(model_dir, adapter, template, model_name, max_prompt_tokens)
    app = create_app(model, model_name, api_key=api_key, default_max_tokens=default_max_tokens)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model")
    log(f"serving '{model_name or model.name}' ({', '.join(sorted(model.modalities))}) at "
        f"http://{host}:{port}/v1  (OpenAI client: base_url='http://{host}:{port}/v1', any api_key"
        + (" you set" if api_key else "") + ")")
    uvicorn.run(app, host=host, port=port, log_level="info")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``mmtune serve`` (shared with ``python -m mmtune.serve.openai_server``)."""
    p.add_argument("model", help="model dir: base, merged, exported adapter, training checkpoint, a composed "
                   "multimodal model, or builtin:tiny")
    p.add_argument("--adapter", help="LoRA adapter dir to load on top of MODEL")
    p.add_argument("--template", default="auto", help="chat template (default: the one saved with the model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", help="model id clients send (default: the model directory's name)")
    p.add_argument("--max-prompt-tokens", type=int, help="refuse prompts longer than this (default: the "
                   "model's context length)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"reply length when a request sets no max_tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")


def run_from_args(args: argparse.Namespace) -> None:
    serve(args.model, args.adapter, args.host, args.port, template=args.template, model_name=args.model_name,
          max_prompt_tokens=args.max_prompt_tokens, api_key=args.api_key, default_max_tokens=args.max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmtune serve", description="Serve a model with an OpenAI-compatible API.")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        run_from_args(args)
    except MMTuneError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
