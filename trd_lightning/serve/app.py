"""The FastAPI app of ``trd serve``: ``/health``, ``/v1/models``, ``/tokenize``, ``/v1/completions``, and vLLM's two
weight-update calls, ``/v1/load_lora_adapter`` and ``/collective_rpc`` (``reload_weights``; see ``weights``).

Handlers only translate: a request becomes a ``Job`` for the batching worker (one row per prompt and sample, each
with its seed), and the worker's ``Result`` becomes vLLM's reply layout (``protocol``).
"""

from __future__ import annotations

import asyncio
import secrets
from functools import cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.rollout.seeds import derive_seed
from trd_lightning.serve import protocol, weights
from trd_lightning.serve.engine import BatchingWorker, Job, Result
from trd_lightning.serve.protocol import (
    BadRequest,
    CompletionRequest,
    LoadAdapterRequest,
    ModelInfo,
    RpcRequest,
    TokenizeRequest,
)


def build_app(worker: BatchingWorker, tokenizer, info: ModelInfo) -> FastAPI:
    """The app serving ``worker``'s model under ``info.name``.

    Args:
        worker: runs the jobs.
        tokenizer: the served model's tokenizer (``/tokenize``, and the text of replies).
        info: name, path, context length, vocabulary and the largest log-prob count a request may ask.
    """
    app = FastAPI(title="trd serve", docs_url=None, redoc_url=None)

    @cache
    def decode(token: int) -> str:
        return tokenizer.decode([token])

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest):
        return JSONResponse(protocol.error_body(str(error), error.status, error.param), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(protocol.error_body(f"Invalid request: {first.get('msg', error)}", 400, where), 400)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        served = weights.adapters(worker.engine.model)
        return JSONResponse(protocol.model_list(info.name, info.root, info.max_model_len, info.vocab_size, served))

    def adapter_of(name: str | None) -> str | None:
        """The adapter a request names (None: the base model); an unknown name is a 404, as in vLLM."""
        if name is None or name == info.name:
            return None
        if name in weights.adapters(worker.engine.model):
            return name
        raise BadRequest(f"The model `{name}` does not exist (this server serves `{info.name}`).", "model", 404)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest):
        def load():
            worker.engine.model = weights.load_adapter(worker.engine.model, body.lora_name, body.lora_path)

        await asyncio.wrap_future(worker.call(load))
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/collective_rpc")
    async def collective_rpc(body: RpcRequest):
        if body.method != "reload_weights" or "weights_path" not in body.kwargs:
            raise BadRequest("trd serve answers collective_rpc for reload_weights with kwargs.weights_path only.")
        path = str(body.kwargs["weights_path"])
        await asyncio.wrap_future(worker.call(lambda: weights.reload_weights(worker.engine.model, path)))
        return JSONResponse({"results": [None]})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        return Response(status_code=200)  # nothing cached across requests here

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        adapter_of(body.model)
        ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": strs})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        adapter = adapter_of(body.model)
        protocol.check_request(body, info.vocab_size, info.max_model_len, info.max_logprobs)
        job = _job(body, adapter)
        try:
            result = await asyncio.wrap_future(worker.submit(job))
        except Exception as error:  # the model failed on this batch: say so, as vLLM does, with a 500
            return JSONResponse(protocol.error_body(f"{type(error).__name__}: {error}", 500), status_code=500)
        rows = protocol.prompt_rows(body.prompt)
        return JSONResponse(_reply(body, rows, result, info.name, decode, tokenizer))

    return app


def _job(body: CompletionRequest, adapter: str | None) -> Job:
    """One row per prompt and sample: sample i of a request seeded s is seeded s (n = 1) or derive_seed(s, 0,
    "sample", i); every prompt of a request takes the same seeds, as each is its own request in vLLM."""
    rows = protocol.prompt_rows(body.prompt)
    seed = secrets.randbits(63) if body.seed is None else body.seed
    seeds = [seed] if body.n == 1 else [derive_seed(seed, 0, "sample", i) for i in range(body.n)]
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        sampling = SamplingConfig(body.max_tokens, temperature, 1.0 if body.top_p is None else body.top_p, top_k)
    except ValueError as error:
        raise BadRequest(str(error)) from error
    return Job(
        prompts=[row for row in rows for _ in range(body.n)],
        seeds=seeds * len(rows),
        sampling=sampling,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
        adapter=adapter,
    )


def _reply(body: CompletionRequest, rows: list[list[int]], result: Result, name: str, decode, tokenizer) -> dict:
    choices, completion_tokens = [], 0
    as_ids = bool(body.return_tokens_as_token_ids)
    label = (lambda t: f"token_id:{t}") if as_ids else decode
    for r, tokens in enumerate(result.tokens):
        prompt = rows[r // body.n]
        logprobs = None
        if result.top is not None:
            top = [{label(t): lp for t, lp in position} for position in result.top[r]]
            logprobs = protocol.completion_logprobs([label(t) for t in tokens], result.logprobs[r], top)
        prompt_logprobs = None
        if result.prompt_scores is not None:
            scores = result.prompt_scores[r]
            prompt_logprobs = [None, *(protocol.position_logprobs(p, decode) for p in scores)]
        choices.append(
            protocol.choice(
                index=r,
                text=tokenizer.decode(tokens, skip_special_tokens=body.skip_special_tokens),
                finish_reason="stop" if result.ended[r] else "length",
                stop_reason=None,
                logprobs=logprobs,
                token_ids=tokens if body.return_token_ids else None,
                prompt_logprobs=prompt_logprobs,
                prompt_token_ids=prompt if body.return_token_ids else None,
            )
        )
        completion_tokens += len(tokens)
    return protocol.completion_reply(name, choices, sum(len(r) for r in rows), completion_tokens)
