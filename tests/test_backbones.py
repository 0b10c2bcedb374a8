"""FLUX and Z-Image backbones through the feature-extractor interface, against the full diffusers models.

Every expected value comes from diffusers: the full `FluxTransformer2DModel` / `ZImageTransformer2DModel`, run
through their own forward with the inputs their pipelines build (packed latents and position ids for FLUX, lists
of `(C, 1, H, W)` latents and caption features for Z-Image), with hooks on their blocks.
"""

import json
import os
import subprocess
import tempfile
import textwrap

import PIL.Image
import pytest
import tolerances
import torch
from conftest import use_hub_cache
from diffusers import FluxPipeline, FluxTransformer2DModel, ZImagePipeline, ZImageTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import load_file, save_file

from dinalrm.testing import (
    add_to_hub_cache,
    get_tiny_dinalrm_reward_model,
    get_tiny_flux_components,
    get_tiny_zimage_components,
    tiny_flux_transformer_config,
    tiny_zimage_transformer_config,
    write_tiny_benchmarks,
)
from modeling_dinalrm import FEATURE_EXTRACTORS, DiNaLRMConfig, DiNaLRMModel
from pipeline_dinalrm import DiNaLRMFluxPipeline, DiNaLRMPipeline, DiNaLRMZImagePipeline


pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {
    "flux": (FluxTransformer2DModel, tiny_flux_transformer_config, "black-forest-labs/FLUX.1-dev"),
    "zimage": (ZImageTransformer2DModel, tiny_zimage_transformer_config, "Tongyi-MAI/Z-Image-Turbo"),
}
# What the first two kept blocks need from each checkpoint: embeddings (and Z-Image's refiners), then the blocks.
KEPT = {
    "flux": ("time_text_embed.", "context_embedder.", "x_embedder.", "transformer_blocks.0.", "transformer_blocks.1."),
    "zimage": (
        "all_x_embedder.", "noise_refiner.", "context_refiner.", "t_embedder.", "cap_embedder.", "x_pad_token",
        "cap_pad_token", "layers.0.", "layers.1.",
    ),
}  # fmt: skip
LAYERS = dict(num_layers=2, visual_layers=[0, 1, 2], text_layers=[1, 2], head_num_heads=4)
SIGMAS = torch.tensor([0.3, 0.8])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def full(family):
    """The tiny full diffusers transformer of the family (3 blocks), from a fixed seed."""
    transformer_class, make_config, _ = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformer_class(**make_config()).eval()


@pytest.fixture(scope="module")
def backbone_dir(full, tmp_path_factory):
    """The full transformer saved in small shards, so blocks that are not kept live in files never opened."""
    folder = tmp_path_factory.mktemp("transformer")
    full.save_pretrained(folder, max_shard_size="20KB")
    return folder


@pytest.fixture(scope="module")
def model(backbone_dir):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = DiNaLRMModel.from_backbone(backbone_dir, **LAYERS).eval()
    with torch.no_grad():  # the head starts with zero-initialised layers, which would hide wrong features
        generator = torch.Generator().manual_seed(2)
        for param in model.reward_head.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _inputs(family: str, seed: int = 3):
    """Latents of an image whose token count is not a multiple of 32 (Z-Image pads it), prompt conditioning."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 6, 10, generator=generator)
    prompt = torch.randn(2, 7, 32, generator=generator)
    pooled = torch.randn(2, 32, generator=generator) if family != "zimage" else None
    return latents, prompt, pooled


def _reference_features(family, full, latents, prompt, pooled, sigmas):
    """`(conditioning, [(image, text) after each block])` captured by hooks on the full diffusers model."""
    captured, conditioning = [], []
    blocks = full.transformer_blocks if family == "flux" else full.layers
    embedder = full.time_text_embed if family == "flux" else full.t_embedder
    hooks = [block.register_forward_hook(lambda module, args, out: captured.append(out)) for block in blocks]
    hooks.append(embedder.register_forward_hook(lambda module, args, out: conditioning.append(out)))
    batch, channels, height, width = latents.shape
    try:
        with torch.no_grad():
            if family == "flux":
                full(
                    hidden_states=FluxPipeline._pack_latents(latents, batch, channels, height, width),
                    encoder_hidden_states=prompt,
                    pooled_projections=pooled,
                    timestep=sigmas,  # FluxPipeline passes timestep / 1000 = sigma
                    img_ids=FluxPipeline._prepare_latent_image_ids(
                        batch, height // 2, width // 2, "cpu", latents.dtype
                    ),
                    txt_ids=torch.zeros(prompt.shape[1], 3),
                    guidance=torch.full((batch,), 3.5),
                )
                features = [(image, text) for text, image in captured]
            else:
                full([x.unsqueeze(1) for x in latents], 1 - sigmas, list(prompt))  # ZImagePipeline: (1000 - t) / 1000
                image_tokens = (height // 2) * (width // 2)  # 15, padded to 32; the caption (7 tokens) follows
                features = [(out[:, :image_tokens], out[:, 32 : 32 + prompt.shape[1]]) for out in captured]
    finally:
        for hook in hooks:
            hook.remove()
    return conditioning[0], features


def test_hidden_states_equal_the_full_models_blocks(family, full, model):
    latents, prompt, pooled = _inputs(family)
    conditioning, expected = _reference_features(family, full, latents, prompt, pooled, SIGMAS)
    with torch.no_grad():
        cond, visual, text = model.backbone(latents, prompt, pooled, model.backbone.timestep(SIGMAS, 1000 * SIGMAS))
    # Exact: the wrapper runs the very modules of the full model on the same inputs, in the same order.
    assert torch.equal(cond, conditioning)
    assert len(visual) == 3 and len(text) == 2
    for index in (1, 2):
        assert torch.equal(visual[index], expected[index - 1][0]), f"image stream after block {index}"
        assert torch.equal(text[index - 1], expected[index - 1][1]), f"text stream after block {index}"
    if family == "flux":  # layer 0: the packed, embedded latents
        packed = FluxPipeline._pack_latents(latents, *latents.shape)
        assert torch.equal(visual[0], full.x_embedder(packed).detach())


def test_noise_convention(family, model):
    """FLUX takes sigma (its pipeline passes `t / 1000`), Z-Image `1 - sigma` (its pipeline: `(1000 - t) / 1000`)."""
    sigmas, _ = model.snap_noise_level(torch.tensor([0.3, 0.8]), 2)
    timestep = model.backbone.timestep(sigmas, 1000 * sigmas)
    assert torch.equal(timestep, sigmas if family == "flux" else 1 - sigmas)
    output = model(torch.zeros(2, 16, 6, 10), sigmas, *_inputs(family)[1:])
    assert torch.equal(output.timesteps, timestep) and model.config.backbone == family


def test_from_backbone_reads_only_the_kept_blocks(family, full, tmp_path, safetensors_reads):
    full.save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    opened, read = safetensors_reads
    model = DiNaLRMModel.from_backbone(tmp_path, **LAYERS)
    kept = KEPT[family]
    expected = {key for key in weight_map if key.startswith(kept)}
    assert set(read) == expected and len(read) == len(expected)
    shards = {weight_map[key] for key in expected}
    assert set(opened) == shards and len(shards) < len(set(weight_map.values()))
    state = full.state_dict()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_real_configs_build_with_the_papers_depths():
    """FLUX.1-dev's first 19 double-stream blocks and Z-Image-Turbo's first 16 layers, on the meta device."""
    for family, depth, width, cond in (("flux", 19, 3072, 3072), ("zimage", 16, 3840, 256)):
        config = DiNaLRMConfig(backbone=family, num_backbone_layers=depth, visual_layers=[depth], text_layers=[depth])
        with torch.device("meta"):
            model = DiNaLRMModel(config)
        blocks = getattr(model.backbone, FEATURE_EXTRACTORS[family].blocks_attribute)
        assert len(blocks) == depth and (config.backbone_width, config.conditioning_width) == (width, cond)
        assert config.base_model_name_or_path == FAMILIES[family][2]


def test_from_backbone_by_hub_id_offline(family, full, tmp_path, monkeypatch):
    """`from_backbone("<owner>/<name>")` on a simulated Hugging Face cache, offline."""
    repo = FAMILIES[family][2]
    full.save_pretrained(tmp_path / "repo" / "transformer")
    add_to_hub_cache(tmp_path / "cache", repo, tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_hub_cache(monkeypatch, tmp_path / "cache")
    model = DiNaLRMModel.from_backbone(repo, **LAYERS)
    assert model.config.backbone == family and model.config.base_model_name_or_path == repo
    state = full.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in model.backbone.state_dict().items())


def test_old_configs_without_a_family_load_as_sd3():
    config = DiNaLRMConfig.from_dict({"num_backbone_layers": 4, "visual_layers": [2, 4], "text_layers": [2]})
    assert config.backbone == "sd3" and config.backbone_config["caption_projection_dim"] == 1536


def test_reward_gradients_reach_the_latents(family, model):
    latents, prompt, pooled = _inputs(family)
    latents.requires_grad_(True)
    rewards = model.score_latents(latents, prompt, pooled, t=[0.2, 0.7], generator=torch.Generator().manual_seed(0))
    rewards.sum().backward()
    assert rewards.shape == (2,) and latents.grad is not None
    assert latents.grad.abs().flatten(1).sum(1).gt(0).all()


def test_save_and_load_keep_the_rewards_and_lora_merges(family, model, tmp_path):
    latents, prompt, pooled = _inputs(family)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    model.save_pretrained(tmp_path / "plain")
    reloaded = DiNaLRMModel.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        before = model.score_latents(latents, prompt, pooled, noise=noise)
        # Exact: the reloaded weights are the saved ones and the computation is the same.
        assert torch.equal(reloaded.score_latents(latents, prompt, pooled, noise=noise), before)
        lora = DiNaLRMModel.from_pretrained(tmp_path / "plain").eval()
        lora.add_lora(rank=2)
        targets = lora.lora_layers()
        assert targets and all(
            name.startswith(FEATURE_EXTRACTORS[family].blocks_attribute) or "refiner" in name for name in targets
        )
        for name, layer in targets.items():  # a trained adapter: B != 0
            layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(len(name)))
        adapted = lora.score_latents(latents, prompt, pooled, noise=noise)
        assert not torch.allclose(adapted, before)
        lora.save_pretrained(tmp_path / "merged")
        lora.merge_lora()
        merged = lora.score_latents(latents, prompt, pooled, noise=noise)
        from_merged = (
            DiNaLRMModel.from_pretrained(tmp_path / "merged")
            .eval()
            .score_latents(latents, prompt, pooled, noise=noise)
        )
    tolerances.assert_close(merged, adapted)
    tolerances.assert_close(from_merged, adapted)


@pytest.mark.slow  # starts a Python process: 5-20 s on a shared 2-core machine
def test_fresh_process_loads_every_family_with_automodel_and_remote_code(tmp_path, warm_python):
    """One new process (none of our modules imported yet; transformers and diffusers imported afresh) loads a saved
    SD3 (LoRA merged on save), FLUX and Z-Image reward model with `AutoModel` and remote code, and scores as the
    models in this process do."""
    models = {"sd3": get_tiny_dinalrm_reward_model(lora_rank=4)}
    for layer in models["sd3"].lora_layers().values():  # a trained adapter: B != 0, so merging changes weights
        layer.lora_B["default"].weight.data.normal_(generator=torch.Generator().manual_seed(7))
    for name in FAMILIES:
        transformer_class, make_config, _ = FAMILIES[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models[name] = _tiny_reward_model(transformer_class(**make_config()))
    expected = {}
    for name, model in sorted(models.items()):
        folder = tmp_path / name / "reward_model"
        model.save_pretrained(folder)
        assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "modeling_dinalrm.py"]
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_dinalrm.DiNaLRMModel" and config["lora_rank"] == 0
        latents, prompt, pooled = _inputs(name)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
        tensors = {"latents": latents, "prompt": prompt, "noise": noise}
        save_file(tensors | ({"pooled": pooled} if pooled is not None else {}), tmp_path / name / "inputs.safetensors")
        with torch.no_grad():
            expected[name] = model.score_latents(latents, prompt, pooled, noise=noise)
    script = textwrap.dedent(
        """
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel
        assert not any("modeling_dinalrm" in name for name in sys.modules)
        for family in sys.argv[1:]:
            model = AutoModel.from_pretrained(f"{family}/reward_model", trust_remote_code=True).eval()
            x = load_file(f"{family}/inputs.safetensors")
            with torch.no_grad():
                rewards = model.score_latents(x["latents"], x["prompt"], x.get("pooled"), noise=x["noise"])
            save_file({"rewards": rewards.contiguous()}, f"{family}/out.safetensors")
            print(model.config.backbone)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    command = [warm_python, "-c", script, *sorted(models)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-3:] == sorted(models)
    for name, rewards in expected.items():
        out = load_file(tmp_path / name / "out.safetensors")["rewards"]
        tolerances.assert_close(out, rewards)


@pytest.mark.parametrize(
    "flux_change, zimage_change, message",
    [
        (lambda x, p, q: (x[:, :15], p, q), lambda x, p, q: (x[:, :15], p, q), "channels"),
        (
            lambda x, p, q: (x[..., :9], p, q),
            lambda x, p, q: (x[..., :9], p, q),
            "must be even|divisible by the patch",
        ),
        (lambda x, p, q: (x, p[..., :16], q), lambda x, p, q: (x, p[..., :16], q), "prompt_embeds have dim"),
        (lambda x, p, q: (x, p, None), lambda x, p, q: (x, p, torch.zeros(2, 32)), "pooled_prompt_embeds"),
        (lambda x, p, q: (x, p[:1], q), lambda x, p, q: (x, p[:1], q), "batch mismatch"),
    ],
)
def test_bad_inputs_get_clear_errors(family, model, flux_change, zimage_change, message):
    change = flux_change if family == "flux" else zimage_change
    with pytest.raises(ValueError, match=message):
        model.score_latents(*change(*_inputs(family)))


def _tiny_reward_model(transformer, **kwargs) -> DiNaLRMModel:
    """A reward model on the first two blocks of `transformer`, its head perturbed so that features matter."""
    with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):
        transformer.save_pretrained(folder)
        torch.manual_seed(1)
        reward_model = DiNaLRMModel.from_backbone(folder, **LAYERS, **kwargs).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for param in reward_model.reward_head.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return reward_model


@pytest.fixture(scope="module")
def flux_pipe():
    """A tiny `FluxPipeline` and a FLUX reward model on the first two blocks of its transformer."""
    pipe = FluxPipeline(**get_tiny_flux_components(seed=0))
    return pipe, _tiny_reward_model(pipe.transformer, max_sequence_length=16)


def test_flux_pipeline_scores_images_as_fluxs_own_encoders_do(flux_pipe):
    pipe, reward_model = flux_pipe
    scorer = DiNaLRMFluxPipeline.from_flux(pipe, reward_model)
    assert scorer.vae is pipe.vae and scorer.text_encoder_2 is pipe.text_encoder_2  # shared, not copied
    images = [PIL.Image.effect_noise((64, 48), 40 + 20 * i).convert("RGB") for i in range(2)]
    prompts = ["a red cat", "a blue dog on the beach"]
    rewards = scorer(prompts, images=images, generator=torch.Generator().manual_seed(0), noise_sharing="none").rewards

    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
        pixels = VaeImageProcessor(vae_scale_factor=4).preprocess(images, height=48, width=64)
        latents = (pipe.vae.encode(pixels).latent_dist.mode() - 0.1159) * 0.3611
        expected = reward_model.score_latents(
            latents, prompt_embeds, pooled, generator=torch.Generator().manual_seed(0)
        )
    tolerances.assert_close(rewards, expected)


def test_flux_pipeline_round_trips_and_refuses_other_families(flux_pipe, tmp_path):
    pipe, reward_model = flux_pipe
    scorer = DiNaLRMFluxPipeline.from_flux(pipe, reward_model)
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    before = scorer("a red cat", latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    scorer.save_pretrained(tmp_path)
    reloaded = DiNaLRMPipeline.from_pretrained(tmp_path)  # the family's pipeline class, from the reward model
    assert type(reloaded) is DiNaLRMFluxPipeline
    after = reloaded("a red cat", latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    tolerances.assert_close(after, before)
    with torch.device("meta"):
        sd3_model = DiNaLRMModel(DiNaLRMConfig(num_backbone_layers=1, visual_layers=[1], text_layers=[1]))
    with pytest.raises(ValueError, match="FLUX backbone"):
        DiNaLRMFluxPipeline.from_flux(pipe, sd3_model)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_run_eval_scores_a_model_of_the_family_and_checks_it(family, flux_pipe, zimage_pipe, tmp_path, capsys):
    """`eval/run_eval.py --backbone flux|zimage` on a saved DiNa-LRM repository of that family; a wrong family is
    refused."""
    from dinalrm.evaluation import runner as run_eval

    pipe, reward_model = flux_pipe if family == "flux" else zimage_pipe
    pipeline_class = DiNaLRMFluxPipeline if family == "flux" else DiNaLRMZImagePipeline
    pipeline_class._sharing(pipe, reward_model).save_pretrained(tmp_path / f"{family}-dinalrm")
    data = write_tiny_benchmarks(tmp_path / "data")
    common = ["--model", str(tmp_path / f"{family}-dinalrm"), "--benchmarks", "hpdv2", "--data_dir", data]
    common += ["--cache_dir", str(tmp_path / "cache")]
    assert run_eval.main([*common, "--backbone", "sd3", "--output_dir", str(tmp_path / "wrong")]) == 2
    assert f"on a {family} backbone" in capsys.readouterr().err
    assert run_eval.main([*common, "--backbone", family, "--output_dir", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results) == [f"DiNa-LRM [{family}-dinalrm] t=0.4 noise={mode}" for mode in ("none", "prompt")]
    for entries in results.values():
        assert entries["hpdv2"]["n_pairs"] == 9  # C(3,2) + C(4,2), as the SD3 runner test counts them


def test_pre_embedded_context_gives_the_same_rewards(family, model):
    latents, prompt, pooled = _inputs(family)
    embedded = model.embed_context(prompt)
    assert embedded.shape == (*prompt.shape[:2], model.config.backbone_width)
    with torch.no_grad():
        expected = model(latents, 0.6, prompt, pooled).rewards
        rewards = model(latents, 0.6, embedded, pooled, context_embedded=True).rewards
    tolerances.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="context_embedded=True"):
        model(latents, 0.6, embedded[..., :16], pooled, context_embedded=True)


@pytest.fixture(scope="module")
def zimage_pipe():
    """A tiny `ZImagePipeline` (Qwen3 text encoder) and a Z-Image reward model on its transformer's first blocks."""
    pipe = ZImagePipeline(**get_tiny_zimage_components(seed=0))
    return pipe, _tiny_reward_model(pipe.transformer, max_sequence_length=64)


def test_zimage_captions_of_different_lengths_match_the_full_model_and_their_own_batch(zimage_pipe):
    """Caption features of different lengths (7 and 40 tokens: one and two blocks of 32) are padded and masked as
    `ZImageTransformer2DModel.forward` does: the features equal the full model's, and rewards equal each alone."""
    pipe, model = zimage_pipe
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 6, 10, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    captions = [torch.randn(7, 32, generator=generator), torch.randn(40, 32, generator=generator)]
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, out: captured.append(out)) for layer in pipe.transformer.layers]
    try:
        with torch.no_grad():
            pipe.transformer([x.unsqueeze(1) for x in latents], 1 - SIGMAS, captions)
    finally:
        for hook in hooks:
            hook.remove()
    batch, prompt_mask = model._batch_prompts(captions)
    with torch.no_grad():
        _, visual, text = model.backbone(latents, batch, None, 1 - SIGMAS, prompt_mask)
    for layer, (image_out, text_out) in enumerate(zip(visual[1:], text), start=1):
        expected = captured[layer - 1]
        tolerances.assert_close(image_out, expected[:, :15])  # 15 image tokens, pad to 32
        for i, caption in enumerate(captions):
            tolerances.assert_close(text_out[i, : len(caption)], expected[i, 32 : 32 + len(caption)])
    with torch.no_grad():
        together = model.score_latents(latents, captions, t=[0.3, 0.7], noise=noise)
        alone = [model.score_latents(latents[i : i + 1], [c], t=[0.3, 0.7], noise=noise[i : i + 1]) for i, c in
                 enumerate(captions)]  # fmt: skip
    tolerances.assert_close(together, torch.cat(alone))
    model.config.max_backbone_batch_size = 1  # one caption per pass: passes of different text lengths
    try:
        with torch.no_grad():
            chunked = model.score_latents(latents, captions, t=[0.3, 0.7], noise=noise)
    finally:
        model.config.max_backbone_batch_size = None
    tolerances.assert_close(chunked, together)
    with torch.device("meta"):  # SD3.5-Medium's block: refused on its config, no weights needed
        sd3_model = DiNaLRMModel(DiNaLRMConfig(num_backbone_layers=1, visual_layers=[1], text_layers=[1]))
    with pytest.raises(ValueError, match="Z-Image backbones only"):
        sd3_model._batch_prompts(captions)


def test_zimage_pipeline_scores_images_as_zimages_own_encoders_do(zimage_pipe):
    pipe, reward_model = zimage_pipe
    scorer = DiNaLRMZImagePipeline.from_zimage(pipe, reward_model)
    assert scorer.vae is pipe.vae and scorer.text_encoder is pipe.text_encoder  # shared, not copied
    images = [PIL.Image.effect_noise((64, 48), 40 + 20 * i).convert("RGB") for i in range(2)]
    prompts = ["a red cat", "a blue dog running on the beach at sunset"]
    rewards = scorer(prompts, images=images, generator=torch.Generator().manual_seed(0), noise_sharing="none").rewards

    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=64)
        assert len({len(e) for e in prompt_embeds}) == 2  # the prompts really have different lengths
        pixels = VaeImageProcessor(vae_scale_factor=4).preprocess(images, height=48, width=64)
        latents = (pipe.vae.encode(pixels).latent_dist.mode() - 0.1159) * 0.3611
        expected = reward_model.score_latents(latents, prompt_embeds, generator=torch.Generator().manual_seed(0))
    tolerances.assert_close(rewards, expected)
    precomputed = scorer(
        prompt_embeds=prompt_embeds, latents=latents, generator=torch.Generator().manual_seed(0), noise_sharing="none"
    ).rewards
    tolerances.assert_close(precomputed, expected)


def test_zimage_pipeline_round_trips_and_refuses_other_families(zimage_pipe, tmp_path):
    pipe, reward_model = zimage_pipe
    scorer = DiNaLRMZImagePipeline.from_zimage(pipe, reward_model)
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cat", "a blue dog running on the beach"]
    before = scorer(prompts, latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    scorer.save_pretrained(tmp_path)
    reloaded = DiNaLRMPipeline.from_pretrained(tmp_path)  # the family's pipeline class, from the reward model
    assert type(reloaded) is DiNaLRMZImagePipeline
    after = reloaded(prompts, latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    tolerances.assert_close(after, before)
    with pytest.raises(ValueError, match="no pooled prompt embedding"):
        scorer(prompt_embeds=[torch.zeros(3, 32)], pooled_prompt_embeds=torch.zeros(1, 32), latents=latents)
    with torch.device("meta"):
        sd3_model = DiNaLRMModel(DiNaLRMConfig(num_backbone_layers=1, visual_layers=[1], text_layers=[1]))
    with pytest.raises(ValueError, match="Z-Image backbone"):
        DiNaLRMZImagePipeline.from_zimage(pipe, sd3_model)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_hub_repo_of_each_family_round_trips(family, flux_pipe, zimage_pipe, tmp_path):
    """`build_hub_repo` assembles a FLUX or Z-Image reward model with its family's pipeline parts (read from the
    generator's folder, transformer left out) and a card with that base model's licence; the folder loads back as the
    family's pipeline and scores as the pipeline built in memory."""
    from huggingface_hub import ModelCard

    from dinalrm.hub import build_hub_repo

    pipe, reward_model = flux_pipe if family == "flux" else zimage_pipe
    pipe.save_pretrained(tmp_path / "base")
    build_hub_repo(reward_model, str(tmp_path / "base"), str(tmp_path / "repo"))
    assert not (tmp_path / "repo" / "transformer").exists()
    loaded = DiNaLRMPipeline.from_pretrained(tmp_path / "repo")
    expected_class, make = {
        "flux": (DiNaLRMFluxPipeline, DiNaLRMFluxPipeline.from_flux),
        "zimage": (DiNaLRMZImagePipeline, DiNaLRMZImagePipeline.from_zimage),
    }[family]
    assert type(loaded) is expected_class
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cat", "a blue dog running on the beach"]
    before = make(pipe, reward_model)(prompts, latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    after = loaded(prompts, latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    tolerances.assert_close(after, before)
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    license_name = {"flux": "flux-1-dev-non-commercial-license", "zimage": None}[family]
    assert (card.data.license, card.data.license_name) == (
        {"flux": "other", "zimage": "apache-2.0"}[family],
        license_name,
    )
    assert {"flux": "FluxPipeline", "zimage": "ZImagePipeline"}[family] in card.text
