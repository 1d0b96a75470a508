"""``pdgate backend``: one emulated instance as its own OpenAI server, speaking vLLM's NIXL and
SGLang's bootstrap P/D handshakes (the server lives in :mod:`backends.server`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from backends.emulator.catalog import Catalog, EngineKnobs
from backends.errors import CatalogError
from backends.server.config import Faults, InstanceConfig


def configure(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--device", required=True, help="catalog device (config/devices/), e.g. h100-sxm")
    a("--model", required=True, help="catalog model (config/models/); also the served name")
    a("--served-model-name", help="the model name clients send (default: --model)")
    a("--count", type=int, help="devices in this instance (default: tp, or derived)")
    a("--tp", type=int, default=1, help="tensor-parallel degree")
    a("--dtype", default="bf16", choices=["bf16", "fp8", "fp4"])
    a("--role", default="both", choices=["prefill", "decode", "both"])
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8100)
    a("--advertise-host", help="host peers reach this instance at (default: --host)")
    a("--bootstrap-port", type=int, help="serve SGLang's bootstrap endpoint on this port")
    a("--time-scale", type=float, default=1.0, help="emulated time runs X times faster; 0: none")
    a("--seed", type=int, help="seed for text of requests without one, and for --fail-rate")
    a("--kv-link", default="roce_200g", help="link this instance hands KV over (links.yaml)")
    a("--kv-lease", type=float, default=30.0, help="seconds held KV waits to be pulled")
    a("--rendezvous-timeout", type=float, default=30.0, help="decode wait for an SGLang room")
    a("--default-max-tokens", type=int, default=256)
    a("--tokenizer", help="Hugging Face tokenizer.json for prompt counting")
    a("--engine", help="engine profile (config/engines, e.g. vllm-0.14, sglang-0.5, trtllm-1.1)")
    a("--max-num-seqs", type=int, help="default 256 (or the engine profile's)")
    a("--max-num-batched-tokens", type=int, help="default 8192 (or the engine profile's)")
    a("--fail-rate", type=float, default=0.0, help="share of requests answered 500")
    a("--fail-after-tokens", type=int, help="streams break after N tokens")
    a("--hang-after-tokens", type=int, help="streams hang after N tokens")
    a("--slowdown", type=float, default=1.0, help="emulated device runs X times slower")
    a(
        "--enable-faults",
        action="store_true",
        help="let POST /admin/faults inject faults (implied by any fault flag above)",
    )
    a(
        "--control-token-env",
        default="PDGATE_CONTROL_TOKEN",
        help="environment variable holding the control plane's shared token",
    )
    a(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a request's headers may take to arrive (slowloris); past it, 408",
    )
    a(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request's body may take after its headers; past it, the connection closes",
    )
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> InstanceConfig:
    faults = Faults()
    injected = (
        args.fail_rate != 0.0
        or args.fail_after_tokens is not None
        or args.hang_after_tokens is not None
        or args.slowdown != 1.0
    )
    faults.update(
        {
            "fail_rate": args.fail_rate,
            "fail_after_tokens": args.fail_after_tokens,
            "hang_after_tokens": args.hang_after_tokens,
            "slowdown": args.slowdown,
        }
    )
    return InstanceConfig(
        device=args.device,
        model=args.model,
        served_model_name=args.served_model_name,
        count=args.count,
        tp=args.tp,
        dtype=args.dtype,
        role=args.role,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        bootstrap_port=args.bootstrap_port,
        time_scale=args.time_scale,
        seed=args.seed,
        kv_link=args.kv_link,
        kv_lease_s=args.kv_lease,
        rendezvous_timeout_s=args.rendezvous_timeout,
        default_max_tokens=args.default_max_tokens,
        tokenizer=args.tokenizer,
        engine=Catalog.load().engine_knobs(
            getattr(args, "engine", None),
            args.device,
            EngineKnobs(
                **{
                    k: v
                    for k, v in (
                        ("max_num_seqs", args.max_num_seqs),
                        ("max_num_batched_tokens", args.max_num_batched_tokens),
                    )
                    if v is not None
                }
            ),
        ),
        faults=faults,
        enable_faults=bool(args.enable_faults or injected),
        control_token=os.environ.get(args.control_token_env) or None,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        catalog = Catalog.load()
        catalog.deployment(
            config.device, config.model, dtype=config.dtype, count=config.count, tp=config.tp,
            engine=config.engine,
        )  # fmt: skip
        catalog.link(config.kv_link)
        if config.time_scale < 0:
            raise ValueError("--time-scale must be >= 0")
        if args.header_timeout <= 0 or args.body_timeout <= 0:
            raise ValueError("--header-timeout and --body-timeout must be > 0")
    except (CatalogError, ValueError) as exc:
        print(f"pdgate backend: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from backends.server.app import create_backend_app
    from backends.server.guard import guarded_protocol

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_backend_app(config, catalog),
        host=config.host,
        port=config.port,
        loop="uvloop",
        # httptools, with header and body read deadlines: peers and the gateway are the only
        # clients, but a slow or stuck one must not hold a connection for ever.
        http=guarded_protocol(
            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout
        ),
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0
