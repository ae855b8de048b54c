"""``trd serve --model NAME_OR_PATH``: a Hugging Face causal LM behind vLLM's OpenAI-compatible completions API.

trd serve --model trd-demo/teacher --port 8000
trd serve --model Qwen/Qwen3-8B --dtype bfloat16 --max-batch-rows 64 --max-logprobs 64
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from trd_lightning.hf import DTYPES, load_causal_lm, load_config, load_tokenizer
from trd_lightning.rollout.engines import EngineOptions, LocalEngine, end_token_ids
from trd_lightning.serve.protocol import ModelInfo


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trd serve",
        description=(
            "Serve a frozen model (an OPD teacher, a TRD refiner) with the subset of vLLM's OpenAI-compatible "
            "completions API that trd's clients use (token-id prompts, seeds, logprobs, prompt_logprobs). A row's "
            "tokens depend only on its prompt and seed, as in-process generation: the same model and seed give "
            "the same rewrites."
        ),
    )
    p.add_argument("--model", required=True, help="name or path of the model (a hub id, a folder, or trd-demo/...)")
    p.add_argument("--served-model-name", default=None, help="the name clients see (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-batch-rows", type=int, default=64, help="the most rows run at once (requests batch)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="a batch runs once no request came for this long")
    p.add_argument(
        "--max-logprobs", type=int, default=20, help="the largest logprobs / prompt_logprobs a request may ask"
    )
    p.add_argument("--decoder", default="native", choices=["native", "generate"], help="in-process decoding loop")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def main(argv: list[str]):
    """Load the model and serve it until interrupted."""
    import uvicorn

    from trd_lightning.serve.app import build_app
    from trd_lightning.serve.engine import BatchingWorker

    args = parser().parse_args(argv)
    if args.max_batch_rows < 1 or args.max_logprobs < 0:
        raise SystemExit("trd serve: --max-batch-rows must be at least 1 and --max-logprobs at least 0.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    config = load_config(args.model, args.trust_remote_code)
    model = load_causal_lm(args.model, args.dtype, args.trust_remote_code).to(device).eval().requires_grad_(False)
    eos = end_token_ids(model, tokenizer)
    options = EngineOptions(decoder=args.decoder, max_rows=args.max_batch_rows)
    worker = BatchingWorker(
        LocalEngine(model, eos, tokenizer.pad_token_id, options), args.max_batch_rows, args.batch_wait_ms / 1000
    )
    info = ModelInfo(
        name=args.served_model_name or args.model,
        root=args.model,
        max_model_len=getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length,
        vocab_size=config.vocab_size,
        max_logprobs=args.max_logprobs,
    )
    config = uvicorn.Config(build_app(worker, tokenizer, info), host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    def announce() -> None:  # once the server answers, not before
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            address = f"http://{args.host}:{args.port}"
            print(f"trd serve: {info.name} ready on {address} ({device}, {args.dtype})", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    finally:
        worker.close()
