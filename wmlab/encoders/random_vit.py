"""``random_vit``: a frozen, randomly initialised ViT (ViT-S/16 shape by default), the "no training" control.

It answers "how much of a pretrained encoder's planning quality is the architecture alone?". The
model is transformers' ``ViTModel`` (no pooling head) initialised by its own init scheme under
``seed``, so the same name + config + seed always gives the same weights; ``EncoderInfo.weights`` is
``"random:seed=<seed>"`` and ``weights_sha256`` hashes the parameters, so feature caches of different
seeds or shapes never collide. Input: the frame resized to ``input_size`` and ImageNet-normalised.
Output: the final (layer-normed) patch tokens, CLS excluded, on a row-major (S/p, S/p) grid.
"""

from __future__ import annotations

import hashlib

import torch

from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderInfo, normalize, resize


def parameters_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and values, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # View as bytes: numpy has no bfloat16, and this is exact for every dtype.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RandomViTEncoder(Encoder):
    def __init__(
        self,
        name: str = "random_vit",
        input_size: int = 224,
        patch_size: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        config = ViTConfig(
            hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
            intermediate_size=int(dim * mlp_ratio), image_size=input_size, patch_size=patch_size,
            layer_norm_eps=1e-6,  # timm's / DINO's ViT-S value (transformers defaults to 1e-12)
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        # Seed only the CPU generator the init draws from, inside fork_rng so the caller's random
        # stream is untouched (torch.manual_seed would also reseed, and initialise, CUDA).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            self.model = ViTModel(config, add_pooling_layer=False)
        self.model.requires_grad_(False)
        self.model.eval()
        g = input_size // patch_size
        import transformers

        self.info = EncoderInfo(
            name=name, num_tokens=g * g, dim=dim, grid=(g, g), input_size=input_size, frozen=True,
            weights=f"random:seed={int(seed)}", weights_sha256=parameters_sha256(self.model),
            extra={
                "patch_size": patch_size, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio,
                "seed": int(seed), "builder": "transformers.ViTModel",
                "transformers": transformers.__version__,
            },
        )  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(images, self.info.input_size)  # (B, 3, S, S)
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state  # (B, 1 + N, D), CLS first
        return hidden[:, 1:]  # (B, N, D) patch tokens, row-major grid

    def train(self, mode: bool = True) -> RandomViTEncoder:
        # Frozen: stays in eval mode whatever a training loop asks (no dropout; nothing to learn).
        return super().train(False)


def make_random_vit(
    name: str = "random_vit",
    weights=None,
    input_size: int = 224,
    patch_size: int = 16,
    dim: int = 384,
    depth: int = 12,
    heads: int = 6,
    mlp_ratio: float = 4.0,
    seed: int = 0,
) -> Encoder:
    """A frozen random ViT; defaults are ViT-S/16 at 224 px (196 tokens of 384). Pick it by ``seed=``."""
    if weights is not None:
        raise ValueError("random_vit has no weights to load (its weights come from seed=); drop weights=")
    return RandomViTEncoder(
        name, input_size=input_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
        mlp_ratio=mlp_ratio, seed=seed,
    )  # fmt: skip
