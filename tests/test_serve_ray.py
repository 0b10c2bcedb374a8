"""`dinalrm-serve --ray`: the same app on Ray Serve with 2 CPU replicas gives the plain server's scores."""

import httpx
import pytest
import ray
import tolerances
import torch
from conftest import REPO_ROOT, free_port
from ray import serve
from safetensors.torch import save

from dinalrm.serving.ray_serve import build_deployment
from dinalrm.serving.server import PROTOCOL_HEADER, ServeOptions
from pipeline_dinalrm import DiNaLRMPipeline


TINY = str(REPO_ROOT / "assets" / "dinalrm-tiny")


# About 60 s on 2 busy cores: a local Ray instance and two replica processes that each import torch and load the model.
@pytest.mark.slow
def test_two_cpu_replicas_return_the_pipeline_scores():
    pipe = DiNaLRMPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    channels = pipe.reward_model.config.backbone_config["in_channels"]
    latents = torch.randn(6, channels, 8, 8, generator=generator)
    embeds, pooled = pipe.encode_prompt(["a red circle", "a blue square"] * 3, "cpu")
    targets = [
        pipe(
            latents=latents[i : i + 1],
            prompt_embeds=embeds[i : i + 1],
            pooled_prompt_embeds=pooled[i : i + 1],
            t=torch.tensor(0.4).item(),
            generator=torch.Generator().manual_seed(i),
        )
        .rewards[0]
        .item()
        for i in range(6)
    ]
    port = free_port()
    env = {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(model=TINY, device="cpu", max_wait_ms=5)
        serve.run(build_deployment(options, num_replicas=2), name="dinalrm", route_prefix="/")
        status = serve.status().applications["dinalrm"].deployments["DiNaLRMServer"]
        assert status.replica_states == {"RUNNING": 2}
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        headers = {"content-type": "application/octet-stream", PROTOCOL_HEADER: "1"}
        scores = []
        for i in range(6):
            tensors = {
                "latents": latents[i : i + 1],
                "prompt_embeds": embeds[i : i + 1].contiguous(),
                "pooled_prompt_embeds": pooled[i : i + 1].contiguous(),
                "u": torch.tensor([0.4]),
                "seeds": torch.tensor([i]),
            }
            response = httpx.post(f"{url}/v1/score", content=save(tensors), headers=headers, timeout=60)
            assert response.status_code == 200, response.text
            scores.append(response.json()["raw_scores"][0])
        assert scores == tolerances.close_to(targets)
    finally:
        serve.shutdown()
        ray.shutdown()
