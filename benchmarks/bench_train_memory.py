#!/usr/bin/env python
"""Where a training step's memory goes, in exact tensor bytes (no timing, so a busy machine does not matter).

On the medium random SD3 setup of `bench_vs_reference.py` (7 of 8 blocks, width 256, LoRA rank 16 + head, a batch of
`--pairs` pairs of 32x32 latents with 154 prompt tokens) it counts, for one `preference_step`:

- the parameters (all, and the trainable ones) and the AdamW state after one step;
- the tensors autograd saves for the backward (distinct storages, counted by `saved_tensors_hooks`), without and
  with gradient checkpointing;
- the bytes per prompt of the feature cache: the text encoders' tokens (raw) vs the context embedder's output
  (compact), for this setup and for SD3.5-Medium (205 and 333 tokens, bf16);
- at SD3.5-Medium scale (modules built on the meta device from the published configs, bf16 weights, fp32 AdamW
  moments for the trainable parameters), what each training process keeps resident besides activations: the
  reference's trainer keeps the three text encoders loaded and encodes every batch's prompts with them; ours trains
  from the feature cache with the encoders freed. Activations are the same per sample on both sides (two forwards
  kept for one backward vs one batched forward) unless ours checkpoints them, so the script also prints up to which
  activation size ours stays within 0.45x of the reference.

    python benchmarks/bench_train_memory.py [--pairs 4]
"""

import argparse
import tempfile
from pathlib import Path


def saved_bytes(model, step) -> int:
    """Bytes of the distinct storages, other than `model`'s parameters, autograd saves while `step()` builds its
    graph: the activations held until the backward."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return sum(storages.values())


# The text encoders of stabilityai/stable-diffusion-3.5-medium (its text_encoder*/config.json): CLIP ViT-L/14,
# OpenCLIP ViT-bigG/14 and the T5 v1.1 XXL encoder.
SD35_TEXT_ENCODER_CONFIGS = {
    "CLIP-L": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
    },
    "CLIP-bigG": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
        "hidden_act": "gelu",
    },
    "T5-XXL": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
}


def real_scale_resident_bytes() -> dict[str, int]:
    """Parameter bytes at SD3.5-Medium scale, counted on the meta device: our reward model (12 blocks, LoRA rank
    16 + head; bf16 weights, fp32 AdamW moments of the trainable part) and the text encoders (bf16)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from modeling_dinalrm import DiNaLRMConfig, DiNaLRMModel

    with torch.device("meta"):
        model = DiNaLRMModel(DiNaLRMConfig())
        model.add_lora(16, 32)
        encoders = {
            name: T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **config))
            if name.startswith("T5")
            else CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))
            for name, config in SD35_TEXT_ENCODER_CONFIGS.items()
        }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": 2 * sum(p.numel() for p in model.parameters()),
        "adamw": 8 * trainable,
        **{name: 2 * sum(p.numel() for p in encoder.parameters()) for name, encoder in encoders.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
    options = parser.parse_args()

    import torch
    from bench_vs_reference import our_training_model

    from dinalrm.testing import medium_transformer_config, save_tiny_sd3_pipeline
    from dinalrm.training.utils import preference_step, seeded_generator

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    config = medium_transformer_config()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        save_tiny_sd3_pipeline(root / "sd3", size="medium")
        generator = torch.Generator().manual_seed(0)
        chosen, rejected = torch.randn(2, options.pairs, config["in_channels"], 32, 32, generator=generator)
        prompt = torch.randn(options.pairs, 154, config["joint_attention_dim"], generator=generator)
        pooled = torch.randn(options.pairs, config["pooled_projection_dim"], generator=generator)
        batch = {
            "chosen": chosen,
            "rejected": rejected,
            "prompt_embeds": prompt,
            "pooled_prompt_embeds": pooled,
            "weights": torch.ones(options.pairs),
        }
        for checkpointing in (False, True):
            model = our_training_model(root, checkpointing)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4)
            figures[checkpointing] = saved_bytes(
                model,
                lambda: preference_step(model, model, batch, seeded_generator(0)).loss,  # noqa: B023
            )
            optimizer.step()
    parameters = nbytes(model.parameters())
    optimizer_state = nbytes(v for state in optimizer.state.values() for v in state.values() if v.ndim)
    print(f"medium SD3 (7 of 8 blocks, width 256), LoRA rank 16 + head, {options.pairs} pairs of 32x32 latents")
    print(
        f"parameters: {parameters:,} bytes ({nbytes(trainable):,} trainable); AdamW state: {optimizer_state:,} bytes"
    )
    print(f"saved for backward: {figures[False]:,} bytes; with gradient checkpointing: {figures[True]:,} bytes")
    width, text_width, pooled = (
        config["caption_projection_dim"],
        config["joint_attention_dim"],
        config["pooled_projection_dim"],
    )
    print(
        f"feature cache per prompt, this setup (154 tokens, float32): raw {(154 * text_width + pooled) * 4:,} bytes, "
        f"compact {(154 * width + pooled) * 4:,} bytes"
    )
    for tokens in (205, 333):
        raw, compact = ((tokens * dim + 2048) * 2 for dim in (4096, 1536))
        print(
            f"feature cache per prompt, SD3.5-Medium ({tokens} tokens, bf16): raw {raw:,} bytes, compact {compact:,}"
        )
    real = real_scale_resident_bytes()
    ours = real["model"] + real["adamw"]
    encoders = sum(real[name] for name in SD35_TEXT_ENCODER_CONFIGS)
    gib = 2**30
    print(
        "SD3.5-Medium scale, resident besides activations: reward model "
        f"{real['model'] / gib:.2f} GiB + AdamW {real['adamw'] / gib:.2f} GiB = {ours / gib:.2f} GiB (ours); "
        f"the reference adds its text encoders "
        + ", ".join(f"{name} {real[name] / gib:.2f} GiB" for name in SD35_TEXT_ENCODER_CONFIGS)
        + f" = {(ours + encoders) / gib:.2f} GiB; ours / reference {ours / (ours + encoders):.2f}x"
    )
    # (ours + A) / (ours + encoders + A) <= 0.45  <=>  A <= (0.45 * encoders - 0.55 * ours) / 0.55
    print(
        "ours stays within 0.45x of the reference while a step's activations (equal on both sides without "
        f"checkpointing) are at most {(0.45 * encoders - 0.55 * ours) / 0.55 / gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
