#!/usr/bin/env python
"""Where a training step's memory goes, in exact tensor bytes (no timing, so a busy machine does not matter).

On the medium random SD3 setup of `bench_vs_reference.py` (7 of 8 blocks, width 256, LoRA rank 16 + head, a batch of
`--pairs` pairs of 32x32 latents with 154 prompt tokens) it counts, for one `preference_step`:

- the parameters (all, and the trainable ones) and the AdamW state after one step;
- the tensors autograd saves for the backward (distinct storages, counted by `saved_tensors_hooks`), without and
  with gradient checkpointing;
- the bytes per prompt of the feature cache: the text encoders' tokens (raw) vs the context embedder's output
  (compact), for this setup and for SD3.5-Medium (205 and 333 tokens, bf16).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
    options = parser.parse_args()

    import torch
    from bench_vs_reference import batch_inputs, our_training_model

    from dinalrm.testing import medium_transformer_config, save_tiny_sd3_pipeline
    from dinalrm.training_utils import preference_step, seeded_generator

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    config = medium_transformer_config()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        save_tiny_sd3_pipeline(root / "sd3", size="medium")
        latents, prompt, pooled = batch_inputs(root, options.pairs, 32)
        chosen, rejected = latents.chunk(2)
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


if __name__ == "__main__":
    main()
