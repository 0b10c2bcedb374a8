#!/usr/bin/env python
"""Throughput and latency of `dinalrm-serve`'s `/v1/score` with the medium random-init reward model (CPU or GPU).

Clients send verl-omni's requests (one sample each, seeded) as fast as the server answers; every client count runs
with micro-batching (`--max-batch-size 8`) and without it (`--max-batch-size 1`), side by side in one run. The app
runs in-process (httpx's ASGI transport), so the figures are the server's own (queueing, batching, the model), not
the network's. Prints requests/s (median of `--repeats` rounds, in which batched and unbatched alternate) and
p50 / p95 latency over all rounds.

    python benchmarks/bench_serve.py [--clients 1 8 64] [--requests 64] [--latent_size 32] [--repeats 3] [--device cpu]
"""

import argparse
import asyncio
import statistics
import tempfile
import time

import httpx
import torch
from bench_model import build_model
from safetensors.torch import save

from dinalrm.serving.server import PROTOCOL_HEADER, ServeOptions, create_app


async def run_clients(app, bodies: list[bytes], clients: int) -> tuple[float, list[float]]:
    """Seconds for all `bodies` sent by `clients` concurrent clients, and each request's latency."""
    headers = {"content-type": "application/octet-stream", PROTOCOL_HEADER: "1"}
    latencies: list[float] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            while (await client.get("/healthz")).status_code != 200:
                await asyncio.sleep(0.01)
            await client.post("/v1/score", content=bodies[0], headers=headers)  # warm-up
            pending = list(bodies)

            async def one_client() -> None:
                while pending:
                    request = pending.pop()
                    start = time.perf_counter()
                    response = await client.post("/v1/score", content=request, headers=headers)
                    latencies.append(time.perf_counter() - start)
                    response.raise_for_status()

            start = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(clients)))
            return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per scenario")
    parser.add_argument("--latent_size", type=int, default=32, help="latent height = width (image size / 8)")
    parser.add_argument("--tokens", type=int, default=333, help="prompt tokens (verl-omni sends 77 CLIP + 256 T5)")
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; batched and unbatched alternate in each")
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 8 requests, 16x16 latents, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.latent_size, args.repeats = [1, 4], 8, 16, 1

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model, config = build_model(folder)
    model.to(args.device)
    generator = torch.Generator().manual_seed(0)
    bodies = [
        save(
            {
                "latents": torch.randn(
                    1, config["in_channels"], args.latent_size, args.latent_size, generator=generator
                ),
                "prompt_embeds": torch.randn(1, args.tokens, config["joint_attention_dim"], generator=generator),
                "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=generator),
                "u": torch.tensor([0.4]),
                "seeds": torch.tensor([i]),
            }
        )
        for i in range(args.requests)
    ]
    print(
        f"medium config: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, latents "
        f"{args.latent_size}x{args.latent_size}, {args.tokens} prompt tokens, {args.requests} requests of one sample "
        f"per scenario, --max-wait-ms {args.max_wait_ms:g}, {args.device}, {args.threads} threads"
    )
    print(f"{'clients':>8}{'max batch':>11}{'requests/s':>12}{'p50 ms':>10}{'p95 ms':>10}")
    for clients in args.clients:
        rates: dict[int, list[float]] = {8: [], 1: []}
        latencies: dict[int, list[float]] = {8: [], 1: []}
        for _ in range(args.repeats):
            for max_batch_size in (8, 1):
                options = ServeOptions(
                    model="medium-random",
                    max_batch_size=max_batch_size,
                    max_wait_ms=args.max_wait_ms,
                    request_timeout_s=600,
                )
                app = create_app(options, loader=lambda options: model)
                seconds, times = asyncio.run(run_clients(app, bodies, clients))
                rates[max_batch_size].append(len(bodies) / seconds)
                latencies[max_batch_size] += times
        for max_batch_size in (8, 1):
            cuts = statistics.quantiles(latencies[max_batch_size], n=20)
            rate = statistics.median(rates[max_batch_size])
            print(f"{clients:>8}{max_batch_size:>11}{rate:>12.2f}{cuts[9] * 1000:>10.0f}{cuts[18] * 1000:>10.0f}")


if __name__ == "__main__":
    main()
