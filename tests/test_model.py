"""DiNaLRMModel behaviour: gradients, randomness, save/load, lazy backbone loading, input errors, objective."""

import json
import math

import pytest
import tolerances
import torch
from conftest import OFFICIAL_TINY
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from dinalrm.testing import get_tiny_dinalrm_reward_model, tiny_transformer_config
from modeling_dinalrm import DiNaLRMConfig, DiNaLRMModel, convert_official_checkpoint


TINY_KW = dict(visual_layers=[2, 3, 4], text_layers=[2, 3, 4], head_num_heads=4)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """The official-tiny checkpoint converted in this process, LoRA kept as an adapter (the converter script's
    `--keep_lora_adapter` output; the script itself is tested in test_converter.py and test_parity_official.py)."""
    folder = tmp_path_factory.mktemp("adapter")
    convert_official_checkpoint(OFFICIAL_TINY, OFFICIAL_TINY / "transformer", backbone_subfolder=None).save_pretrained(
        folder, merge_lora=False
    )
    return folder


@pytest.fixture(scope="module")
def model(adapter_dir) -> DiNaLRMModel:
    return DiNaLRMModel.from_pretrained(adapter_dir).eval()


@pytest.fixture(scope="module")
def batch(official_inputs):
    x = official_inputs
    return x["x0"], x["encoder_hidden_states"], x["pooled_projections"]


def test_reward_gradients_reach_the_latents(model, batch):
    latents, prompt, pooled = batch
    for t in (0.4, [0.2, 0.5, 0.7]):
        x = latents.clone().requires_grad_(True)
        rewards = model.score_latents(x, prompt, pooled, t=t, generator=torch.Generator().manual_seed(0))
        (-rewards.sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_same_generator_gives_the_same_scores(model, batch):
    with torch.no_grad():
        a, b, c = (model.score_latents(*batch, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    # Exact: the same seed draws the same noise for the same computation.
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_default_level_and_ensemble_come_from_the_config(model, batch):
    noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        default = model.score_latents(*batch, noise=noise)
        explicit = model.score_latents(*batch, t=model.config.default_t, noise=noise)
        ensemble = model.score_latents(*batch, t=model.config.ensemble_t, noise=noise)
    # Exact: the default level is the configured one, so the two calls are the same computation.
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, ensemble)


def test_chunked_backbone_equals_one_batched_pass(model, batch):
    noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batched = model.score_latents(*batch, t=[0.2, 0.5, 0.7], noise=noise)
        model.config.max_backbone_batch_size = 2
        try:
            chunked = model.score_latents(*batch, t=[0.2, 0.5, 0.7], noise=noise)
        finally:
            model.config.max_backbone_batch_size = None
    tolerances.assert_close(chunked, batched)


def test_gradient_checkpointing_keeps_values_and_gradients(adapter_dir, batch):
    model = DiNaLRMModel.from_pretrained(adapter_dir)
    noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(1))

    def rewards_and_grad():
        x = batch[0].clone().requires_grad_(True)
        rewards = model.score_latents(x, *batch[1:], noise=noise)
        rewards.sum().backward()
        return rewards.detach(), x.grad

    plain = rewards_and_grad()
    model.gradient_checkpointing_enable()
    assert model.backbone.gradient_checkpointing
    checkpointed = rewards_and_grad()
    tolerances.assert_close(checkpointed[0], plain[0])
    tolerances.assert_close(checkpointed[1], plain[1])


@pytest.mark.parametrize("merge", [True, False])
def test_save_and_load_round_trip(model, batch, tmp_path, merge):
    model.save_pretrained(tmp_path, merge_lora=merge)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").is_file()
    saved_keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(".lora_A." in k for k in saved_keys) is not merge
    reloaded = DiNaLRMModel.from_pretrained(tmp_path).eval()
    assert bool(reloaded.lora_layers()) is not merge
    assert model.lora_layers(), "saving merged must not merge the live model"
    noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.score_latents(*batch, noise=noise)
        after = reloaded.score_latents(*batch, noise=noise)
    tolerances.assert_close(after, before)


def test_from_backbone_reads_only_the_kept_blocks(tmp_path, safetensors_reads):
    config = tiny_transformer_config(num_layers=6)
    torch.manual_seed(0)
    full = SD3Transformer2DModel(**config)
    # Small shards so that the blocks that are not kept live in files that must never be opened.
    full.save_pretrained(tmp_path / "transformer", max_shard_size="60KB")
    shard_index = json.loads((tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    opened, read = safetensors_reads
    model = DiNaLRMModel.from_backbone(tmp_path, num_layers=2, visual_layers=[1, 2], text_layers=[2], head_num_heads=4)

    kept = ("pos_embed.", "time_text_embed.", "context_embedder.", "transformer_blocks.0.", "transformer_blocks.1.")
    assert read and all(key.startswith(kept) for key in read)
    needed_shards = {shard for key, shard in shard_index["weight_map"].items() if key.startswith(kept)}
    assert set(opened) == needed_shards and len(needed_shards) < len(set(shard_index["weight_map"].values()))
    expected_backbone = sum(p.numel() for name, p in full.named_parameters() if name.startswith(kept))
    assert sum(p.numel() for p in model.backbone.parameters()) == expected_backbone
    assert len(model.backbone.transformer_blocks) == 2
    state = full.state_dict()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_backbone_of_full_depth_runs_every_block_as_the_full_model_does():
    """Keeping all blocks includes the last, context-pre-only one: same weights, same image stream."""
    full = SD3Transformer2DModel.from_pretrained(OFFICIAL_TINY / "transformer").eval()
    depth = full.config.num_layers
    model = DiNaLRMModel.from_backbone(
        OFFICIAL_TINY / "transformer", num_layers=depth, visual_layers=[2, depth], text_layers=[2], head_num_heads=4
    ).eval()
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    context = torch.randn(2, 6, full.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, full.config.pooled_projection_dim, generator=generator)
    timestep = torch.tensor([400.0, 700.0])
    with torch.no_grad():
        _, visual, _ = model.backbone(latents, context, pooled, timestep)
        hidden, text = full.pos_embed(latents), full.context_embedder(context)
        temb = full.time_text_embed(timestep, pooled)
        for block in full.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
    assert text is None, "the full model's last block should have no text output"
    tolerances.assert_close(visual[-1], hidden)


def test_add_lora_targets_only_the_backbone_and_starts_as_identity(batch):
    model = DiNaLRMModel.from_backbone(OFFICIAL_TINY / "transformer", num_layers=4, **TINY_KW).eval()
    noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model.score_latents(*batch, noise=noise)
        model.add_lora(rank=4)
        after = model.score_latents(*batch, noise=noise)
    tolerances.assert_close(after, before)
    lora_params = [n for n, p in model.named_parameters() if ".lora_" in n]
    assert lora_params and all(n.startswith("backbone.") for n in lora_params)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("reward_head.") for n in trainable)


def test_merge_lora_keeps_the_rewards(adapter_dir, batch):
    model = DiNaLRMModel.from_pretrained(adapter_dir).eval()
    noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model.score_latents(*batch, noise=noise)
        model.merge_lora()
        after = model.score_latents(*batch, noise=noise)
    assert not model.lora_layers() and model.config.lora_rank == 0
    tolerances.assert_close(after, before)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, p, q: (x[:, :8], p, q), "channels"),
        (lambda x, p, q: (x[..., :31], p, q), "divisible by the patch size"),
        (lambda x, p, q: (x[:2], p, q), "batch mismatch"),
        (lambda x, p, q: (x, p, q[:2]), "batch mismatch"),
        (lambda x, p, q: (x.index_fill(0, torch.tensor([1]), float("nan")), p, q), "NaN"),
        (lambda x, p, q: (x[0], p, q), "4D tensor"),
        (lambda x, p, q: (x, p[..., :16], q), "prompt_embeds have dim"),
    ],
)
def test_bad_inputs_get_clear_errors(model, batch, change, message):
    with pytest.raises(ValueError, match=message):
        model.score_latents(*change(*batch), t=0.4)


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), [0.2, 1.2]])
def test_noise_level_outside_unit_interval_is_refused(model, batch, t):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.score_latents(*batch, t=t)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_backbone_layers=5, visual_layers=[5], text_layers=[3, 5]), "no text output"),
        (dict(num_backbone_layers=4, visual_layers=[2, 5], text_layers=[2]), "visual_layers"),
        (dict(num_backbone_layers=4, visual_layers=[2], text_layers=[4, 6]), "text_layers"),
        (dict(num_backbone_layers=4, visual_layers=[3, 2], text_layers=[2]), "strictly increasing"),
        (dict(num_backbone_layers=9, visual_layers=[2], text_layers=[2]), "num_backbone_layers"),
    ],
)
def test_impossible_layer_choices_are_refused(kwargs, message):
    backbone = json.loads((OFFICIAL_TINY / "transformer" / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        DiNaLRMConfig(backbone_config=backbone, head_num_heads=4, **kwargs)


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_preference_probability_and_loss_follow_the_formulas(model):
    a, b = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    t = 0.3  # a table entry, so snapping leaves it unchanged
    config = model.config
    variance = config.thurstone_k * 0.3**2 + config.thurstone_v0
    expected = [_phi((x - y) / math.sqrt(2 * variance + config.thurstone_eps)) for x, y in zip(a.tolist(), b.tolist())]
    p = model.preference_probability(a, b, t)
    tolerances.assert_close(p, torch.tensor(expected))
    tolerances.assert_close(p + model.preference_probability(b, a, t), torch.ones(3))
    expected_loss = sum(1 - math.sqrt(q + config.thurstone_eps) for q in expected) / 3
    assert model.preference_loss(a, b, t).item() == pytest.approx(expected_loss, rel=1e-6)
    # Noise calibration: the same reward gap is less certain at a higher noise level.
    assert model.preference_probability(a[:1], b[:1], 0.9) < model.preference_probability(a[:1], b[:1], 0.1)


def test_bradley_terry_and_fixed_variance_ablations(model):
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])
    model.config.loss_type = "bradley_terry"
    try:
        expected = [-math.log(1 / (1 + math.exp(-(x - y)))) for x, y in zip(a.tolist(), b.tolist())]
        assert model.preference_loss(a, b, 0.5).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
        model.config.loss_type = "fixed_variance"
        p_low, p_high = model.preference_probability(a, b, 0.1), model.preference_probability(a, b, 0.9)
        tolerances.assert_close(p_low, p_high)
        z = 1.0 / math.sqrt(2 * model.config.fixed_variance + model.config.thurstone_eps)
        assert p_low[0].item() == pytest.approx(_phi(z), rel=1e-6)
    finally:
        model.config.loss_type = "thurstone"


# ---------------------------------------------------------------------------------- tiny-factory model
@pytest.fixture(scope="module")
def tiny(one_thread) -> DiNaLRMModel:
    return get_tiny_dinalrm_reward_model().eval()


@pytest.fixture(scope="module")
def tiny_batch(tiny):
    bc = tiny.config.backbone_config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    prompt = torch.randn(2, 5, bc["joint_attention_dim"], generator=generator)
    pooled = torch.randn(2, bc["pooled_projection_dim"], generator=generator)
    noise = torch.randn(2, 16, 8, 8, generator=generator)
    return latents, prompt, pooled, noise


def _thurstone_losses(config, chosen: list[float], rejected: list[float], sigmas: list[float]) -> list[float]:
    """The fidelity loss 1 - sqrt(P + eps) with P = Phi(diff / sqrt(2 var + eps)), var = k sigma^2 + v0, by hand."""
    losses = []
    for a, b, sigma in zip(chosen, rejected, sigmas):
        variance = config.thurstone_k * sigma**2 + config.thurstone_v0
        p = _phi((a - b) / math.sqrt(2 * variance + config.thurstone_eps))
        losses.append(1 - math.sqrt(p + config.thurstone_eps))
    return losses


def test_preference_loss_per_pair_and_weighted_mean(tiny):
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3, 2.0]), torch.tensor([0.5, 0.4, 0.3, -1.0])
    t = torch.tensor([0.3, 0.5, 0.1, 0.9])  # table entries, so snapping leaves them unchanged
    expected = _thurstone_losses(tiny.config, chosen.tolist(), rejected.tolist(), t.tolist())
    per_pair = tiny.preference_loss(chosen, rejected, t, reduction="none")
    assert per_pair.shape == (4,)
    tolerances.assert_close(per_pair, torch.tensor(expected))
    assert tiny.preference_loss(chosen, rejected, t).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # A float t is one level for every pair.
    same_level = _thurstone_losses(tiny.config, chosen.tolist(), rejected.tolist(), [0.5] * 4)
    tolerances.assert_close(tiny.preference_loss(chosen, rejected, 0.5, reduction="none"), torch.tensor(same_level))

    weights = torch.tensor([2.0, 0.0, 1.0, 1.0])
    weighted = sum(w * x for w, x in zip(weights.tolist(), expected)) / 4.0
    assert tiny.preference_loss(chosen, rejected, t, weights=weights).item() == pytest.approx(weighted, rel=1e-6)
    assert tiny.preference_loss(chosen, rejected, t, weights=torch.zeros(4)).item() == 0.0  # not NaN


def test_preference_loss_refuses_a_bad_reduction(tiny):
    rewards = torch.zeros(2)
    with pytest.raises(ValueError, match="reduction='sum'.*'mean' or 'none'"):
        tiny.preference_loss(rewards, rewards, 0.4, reduction="sum")
    with pytest.raises(ValueError, match="weights"):
        tiny.preference_loss(rewards, rewards, 0.4, weights=torch.ones(2), reduction="none")


def _nan_at(tensor: torch.Tensor, index: int) -> torch.Tensor:
    broken = tensor.clone()
    broken[index] = float("nan")
    return broken


@pytest.mark.parametrize(
    "position, name", [(0, "latents"), (1, "prompt_embeds"), (2, "pooled_prompt_embeds"), (3, "noise")]
)
def test_non_finite_inputs_are_refused_on_the_cpu_unless_check_finite_is_false(tiny, tiny_batch, position, name):
    inputs = list(tiny_batch)
    inputs[position] = _nan_at(inputs[position], 1)
    latents, prompt, pooled, noise = inputs
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"^{name} contains? NaN or infinite values: \w+"):
            tiny.score_latents(latents, prompt, pooled, t=0.4, noise=noise)
        rewards = tiny.score_latents(latents, prompt, pooled, t=0.4, noise=noise, check_finite=False)
    assert torch.isfinite(rewards[0]) and not torch.isfinite(rewards[1])


def test_check_finite_covers_forward_and_a_tensor_t(tiny, tiny_batch):
    latents, prompt, pooled, _ = tiny_batch
    with torch.no_grad():
        with pytest.raises(ValueError, match="^latents contain NaN"):
            tiny(_nan_at(latents, 0), 0.4, prompt, pooled)
        assert torch.isnan(tiny(_nan_at(latents, 0), 0.4, prompt, pooled, check_finite=False).rewards[0])
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            tiny(latents, torch.tensor([0.2, 1.5]), prompt, pooled)
        # Unchecked, an out-of-range tensor t snaps to the table's nearest entry, as a value read on a GPU would.
        sigmas = tiny(latents, torch.tensor([0.2, 1.5]), prompt, pooled, check_finite=False).sigmas
    assert sigmas[1].item() == tiny._sigma_table.max().item()
    with pytest.raises(ValueError, match=r"\[0, 1\]; got nan"):
        tiny.snap_noise_level(float("nan"), 2, check_finite=False)  # a Python number is always checked


@pytest.mark.slow  # a fresh interpreter / a torch.compile: 7-18 s on a shared 2-core machine
@pytest.mark.parametrize("t", [0.4, [0.2, 0.5, 0.7]], ids=["single", "ensemble"])
def test_score_latents_compiles_without_graph_breaks(tiny, tiny_batch, t):
    """`torch.compile` captures score_latents whole: no data-dependent branch, no value read back (the default
    value checks are skipped while compiling). The noise is passed explicitly: drawing it from a
    `torch.Generator` inside the compiled region is out of scope (dynamo breaks the graph at the draw)."""
    latents, prompt, pooled, noise = tiny_batch
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(tiny.score_latents)(latents, prompt, pooled, t=t, noise=noise)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_pre_embedded_context_gives_the_same_rewards(tiny, tiny_batch):
    latents, prompt, pooled, noise = tiny_batch
    embedded = tiny.embed_context(prompt)
    width = tiny.config.backbone_config["caption_projection_dim"]
    assert embedded.shape == (*prompt.shape[:2], width)
    linear = tiny.backbone.context_embedder
    tolerances.assert_close(embedded, prompt @ linear.weight.T + linear.bias)
    with torch.no_grad():
        expected = tiny(latents, 0.6, prompt, pooled).rewards
        rewards = tiny(latents, 0.6, embedded, pooled, context_embedded=True).rewards
        ensemble = tiny.score_latents(latents, prompt, pooled, t=[0.3, 0.7], noise=noise)
        ensemble_embedded = tiny.score_latents(
            latents, embedded, pooled, t=[0.3, 0.7], noise=noise, context_embedded=True
        )
    tolerances.assert_close(rewards, expected)
    tolerances.assert_close(ensemble_embedded, ensemble)
    with pytest.raises(ValueError, match="context_embedded=True expects the context embedder's output"):
        tiny(latents, 0.6, embedded[..., :16], pooled, context_embedded=True)
