"""``vfm_vae`` (released VFM-VAE encoder) and ``dino_tok`` (wmlab's DINO-Tok reimplementation), offline.

VFM-VAE: a tiny SigLIP tower saved in the Hub layout, and a synthetic ``G_ema`` checkpoint written key by key
with the upstream names (``ldm_adapter.patch_quants.{i}.0.blocks.{j}.*``, ``ldm_adapter.final_quant.*``, plus
decoder and frozen-tower keys). The encoder's output is checked against a functional reference forward
written here from the upstream definition, so a wrong key mapping, head averaging or unshuffle order fails.
DINO-Tok: a tiny DINOv2 and the 32 px ``tiny_store``; training, saving, loading and resuming end to end.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers")
import transformers

from wmlab.encoders import make_encoder
from wmlab.encoders import vfm_vae as V
from wmlab.encoders import weights as W
from wmlab.encoders.base import normalize, resize

transformers.logging.set_verbosity_error()

REAL_WEIGHTS_DIR = os.environ.get("WMLAB_WEIGHTS_DIR", "")
C = 32  # tiny SigLIP width
OUT = 16  # per-layer projection width (release: 1024 -> 64)
Z = 32  # latent channels, as released


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU OpenMP's barriers make
    them up to 100x slower at random; one thread keeps this module's runtime steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("WMLAB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WMLAB_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(W, "_hf_cache_lookup", lambda hub_id: None)
    monkeypatch.setattr(V, "_hf_cached_checkpoint", lambda: None)


def _frames(b: int = 2, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------
# VFM-VAE


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny SigLIP saved as the Hub's fixed-resolution SigLIP2 is: SiglipModel, model_type 'siglip'."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = dict(hidden_size=C, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=16)  # fmt: skip
    text = dict(
        hidden_size=C, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    path = tmp_path_factory.mktemp("siglip") / "siglip"
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(path)
    return path


def _siglip(path):
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(str(path), local_files_only=True).eval()


def _projection_shapes(prefix: str, in_dim: int, out_dim: int, depth: int) -> dict:
    """Upstream ``AttnProjection(is_quant=True)``: depth-1 blocks in -> in, the last in -> out."""
    shapes = {}
    for j in range(depth):
        o = out_dim if j == depth - 1 else in_dim
        width = in_dim if in_dim > o else o
        p = f"{prefix}blocks.{j}."
        shapes |= {
            p + "norm1.weight": (in_dim,), p + "norm1.bias": (in_dim,),
            p + "attn.qkv.weight": (3 * width, in_dim),
            p + "attn.q_bias": (width,), p + "attn.v_bias": (width,),
            p + "attn.zero_k_bias": (width,), p + "attn.proj.weight": (o, o), p + "attn.proj.bias": (o,),
            p + "proj.weight": (o, in_dim), p + "proj.bias": (o,),
            p + "norm3.weight": (in_dim,), p + "norm3.bias": (in_dim,),
            p + "norm2.weight": (o,), p + "norm2.bias": (o,),
            p + "mlp.norm.weight": (o,), p + "mlp.norm.bias": (o,),
            p + "mlp.w0.weight": (2 * o, o), p + "mlp.w0.bias": (2 * o,),
            p + "mlp.w1.weight": (2 * o, o), p + "mlp.w1.bias": (2 * o,),
            p + "mlp.w2.weight": (o, 2 * o), p + "mlp.w2.bias": (o,),
        }  # fmt: skip
    return shapes


def _g_ema(depth: int = 1, seed: int = 0, tower: dict | None = None) -> dict:
    """A synthetic VFM-VAE ``G_ema`` state dict: encoder head, decoder keys, optionally the frozen tower."""
    shapes = {}
    for i in range(3):
        shapes |= _projection_shapes(f"ldm_adapter.patch_quants.{i}.0.", C, OUT, depth)
    shapes |= _projection_shapes("ldm_adapter.final_quant.", 3 * OUT * 4, 2 * Z, depth)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("zero_k_bias"):
            sd[k] = torch.zeros(s)
        elif "norm" in k and k.endswith(".weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(s, generator=g)
        else:
            sd[k] = torch.randn(s, generator=g) * (0.3 if len(s) == 1 else 1.0 / s[-1] ** 0.5)
    # decoder side: recognised and ignored
    sd["ldm_adapter.post_quant.blocks.0.norm1.weight"] = torch.ones(Z)
    sd["synthesis.b16.conv0.weight"] = torch.zeros(4, 4, 3, 3)
    sd["mapping.mlp.fc0.weight"] = torch.zeros(4, 4)
    for k, v in (tower or {}).items():  # transformers 4.x layout: SiglipVisionModel.vision_model.*
        sd[f"vfm_encoder.encoder.vision_model.vision_model.{k}"] = v.clone()
    return sd


def _save(tmp_path, sd: dict, name: str = V.CKPT_FILE, wrap: bool = True):
    path = tmp_path / name
    torch.save(
        {"G": {}, "D": {}, "G_ema": sd, "training_set_kwargs": {"resolution": 256}} if wrap else sd, path
    )
    return path


def _ref_block(sd: dict, p: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Upstream AttnProjectionBlock, functionally from its key names. (B, N, in) -> (B, N, out)."""

    def ln(t, name, eps=1e-5):
        return F.layer_norm(t, (t.shape[-1],), sd[p + name + ".weight"], sd[p + name + ".bias"], eps)

    B, N, in_dim = x.shape
    out_dim = sd[p + "proj.weight"].shape[0]
    width = sd[p + "attn.q_bias"].shape[0]
    h = ln(x, "norm1")
    bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(width), sd[p + "attn.v_bias"]])
    q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], bias).chunk(3, dim=-1)  # 3 x (B, N, width)

    def split(t):
        return t.reshape(B, N, heads, width // heads).transpose(1, 2)  # (B, heads, N, hd)

    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1) @ v  # (B, heads, N, hd)
    if in_dim > out_dim:
        a = att.mean(1)  # (B, N, hd): heads averaged
        if a.shape[-1] != out_dim:
            a = F.adaptive_avg_pool1d(a, out_dim)
    else:
        a = att.transpose(1, 2).reshape(B, N, width)
    a = F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = F.linear(ln(x, "norm3"), sd[p + "proj.weight"], sd[p + "proj.bias"]) + a
    m = ln(ln(x, "norm2"), "mlp.norm", 1e-6)
    m = F.gelu(F.linear(m, sd[p + "mlp.w0.weight"], sd[p + "mlp.w0.bias"]), approximate="tanh") * F.linear(
        m, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"]
    )
    return x + F.linear(m, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])


def _ref_projection(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    depth = 1 + max(int(k[len(prefix) :].split(".")[1]) for k in sd if k.startswith(prefix))
    heads = max(1, x.shape[-1] // sd[f"{prefix}blocks.{depth - 1}.proj.weight"].shape[0])
    for j in range(depth):
        x = _ref_block(sd, f"{prefix}blocks.{j}.", x, heads)
    return x


def _ref_vfm_vae(sd: dict, siglip_dir, frames: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: upstream preprocessing, layers [0, 1, -1] of the 2-block tower, head -> (mu, logvar)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    x = F.interpolate(
        resize(x, size), scale_factor=2.0, mode="bilinear", align_corners=False
    )  # (B, 3, 2S, 2S)
    x = normalize(x, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        out = _siglip(siglip_dir)(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
        feats = [out.hidden_states[0], out.hidden_states[1], out.last_hidden_state]  # (B, H*W, C) each
        H = 2 * size // 16
        parts = []
        for i, f in enumerate(feats):
            y = _ref_projection(sd, f"ldm_adapter.patch_quants.{i}.0.", f)  # (B, H*W, o)
            B, _, o = y.shape
            y = y.reshape(B, H // 2, 2, H // 2, 2, o)  # (B, h, i, w, j, o)
            y = y.permute(0, 1, 3, 5, 2, 4).reshape(B, (H // 2) ** 2, o * 4)  # channel = c*4 + i*2 + j
            parts.append(y)
        z = _ref_projection(sd, "ldm_adapter.final_quant.", torch.cat(parts, -1))  # (B, h*w, 2Z)
    return z[..., :Z], z[..., Z:].clamp(-30, 20)


@pytest.mark.parametrize("depth", [1, 2])
def test_vfm_vae_matches_reference_forward(siglip_dir, tmp_path, depth):
    sd = _g_ema(depth=depth)
    path = _save(tmp_path, sd)
    enc = make_encoder("vfm_vae", weights=str(path), siglip_weights=str(siglip_dir), layers=[0, 1, -1],
                       input_size=32)  # fmt: skip
    assert (enc.num_tokens, enc.dim, enc.grid, enc.input_size) == (4, Z, (2, 2), 32)
    assert enc.frozen and all(not p.requires_grad for p in enc.parameters())
    frames = _frames()
    tokens = enc.encode(frames)
    mu, logvar = _ref_vfm_vae(sd, siglip_dir, frames, 32)
    assert tokens.shape == (2, 4, Z)
    torch.testing.assert_close(tokens, mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.encode(frames), tokens, atol=0, rtol=0)  # mu, not a sample
    with torch.no_grad():
        m2, lv2 = enc.forward_distribution(enc.preprocess(frames.permute(0, 3, 1, 2).float() / 255))
    torch.testing.assert_close(lv2, logvar, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(m2, lv2, atol=1e-3)
    assert enc.info.weights_sha256 == W.weights_sha256(path)
    assert enc.info.extra["siglip_sha256"] == W.weights_sha256(siglip_dir)
    assert enc.tower_checked == 0  # no tower keys in this checkpoint


def test_vfm_vae_grid_at_224_and_tower_check(siglip_dir, tmp_path):
    tower = _siglip(siglip_dir).state_dict()
    path = _save(tmp_path, _g_ema(tower=tower))
    enc = make_encoder("vfm_vae", weights=str(tmp_path), siglip_weights=str(siglip_dir), layers=[0, 1, -1])
    assert enc.info.weights == str(path)  # the folder resolves to the file in it
    assert enc.grid == (14, 14) and enc.info.extra["model_input"] == 448
    assert enc.encode(_frames(1, 224)).shape == (1, 196, Z)  # 14x14x32 at 224
    assert enc.tower_checked == len(tower)
    assert make_encoder("vfm_vae", weights=str(path), siglip_weights=str(siglip_dir), layers=[0, 1, -1],
                        token_pool=2).encode(_frames(1, 224)).shape == (1, 49, Z)  # fmt: skip

    bad = dict(tower)
    bad["embeddings.patch_embedding.weight"] = bad["embeddings.patch_embedding.weight"] + 1.0
    other = _save(tmp_path, _g_ema(tower=bad), name="other.pth")
    with pytest.raises(ValueError, match="differs from the loaded SigLIP2"):
        make_encoder("vfm_vae", weights=str(other), siglip_weights=str(siglip_dir), layers=[0, 1, -1])
    make_encoder("vfm_vae", weights=str(other), siglip_weights=str(siglip_dir), layers=[0, 1, -1],
                 check_tower=False)  # fmt: skip


def test_vfm_vae_key_errors(siglip_dir, tmp_path):
    kw = dict(siglip_weights=str(siglip_dir), layers=[0, 1, -1], input_size=32)
    sd = _g_ema()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "ldm_adapter.final_quant.blocks.0.mlp.w2.bias"},
                    r"missing.*ldm_adapter\.final_quant\.blocks\.0\.mlp\.w2\.bias"),
        "unknown_encoder": ({**sd, "ldm_adapter.patch_quants.1.0.blocks.0.attn.extra": torch.zeros(1)},
                            r"unknown.*patch_quants\.1\.0\.blocks\.0\.attn\.extra"),
        "unknown_role": ({**sd, "mystery.weight": torch.zeros(1)}, "mystery"),
    }  # fmt: skip
    for name, (bad, pattern) in cases.items():
        with pytest.raises(KeyError, match=pattern):
            make_encoder("vfm_vae", weights=str(_save(tmp_path, bad, f"{name}.pth")), **kw)
    with pytest.raises(ValueError, match="discrete"):
        make_encoder("vfm_vae", weights=str(_save(tmp_path, {**sd, "ldm_adapter.quantizer.w": torch.zeros(1)},
                                                  "vq.pth")), **kw)  # fmt: skip
    with pytest.raises(ValueError, match="3 feature branches"):
        make_encoder(
            "vfm_vae", weights=str(_save(tmp_path, sd)), siglip_weights=str(siglip_dir), layers=[0, -1]
        )
    # a bare G_ema state dict (no wrapper) loads too
    enc = make_encoder("vfm_vae", weights=str(_save(tmp_path, sd, "bare.pth", wrap=False)), **kw)
    assert enc.encode(_frames(1)).shape == (1, 4, Z)


def test_vfm_vae_restricted_unpickling(siglip_dir, tmp_path, monkeypatch):
    kw = dict(siglip_weights=str(siglip_dir), layers=[0, 1, -1], input_size=32)
    sd = _g_ema()

    def save_with(module_name: str, class_name: str, path):
        cls = type(class_name, (dict,), {"__module__": module_name})
        parts = module_name.split(".")
        with monkeypatch.context() as m:  # the modules exist only while saving
            for i in range(len(parts)):
                module = types.ModuleType(".".join(parts[: i + 1]))
                m.setitem(sys.modules, module.__name__, module)
                if i:
                    setattr(sys.modules[".".join(parts[:i])], parts[i], module)
            setattr(sys.modules[module_name], class_name, cls)
            torch.save({"G_ema": sd, "training_set_kwargs": cls(path="x", resolution=256)}, path)
        assert module_name not in sys.modules
        return path

    # upstream's dnnlib.util.EasyDict: read as a plain dict, nothing of dnnlib is imported or run
    path = save_with("dnnlib.util", "EasyDict", tmp_path / "easydict.pth")
    assert make_encoder("vfm_vae", weights=str(path), **kw).encode(_frames(1)).shape == (1, 4, Z)
    path = save_with("evil", "Payload", tmp_path / "evil.pth")
    with pytest.raises(RuntimeError, match=r"weights_only=True.*evil\.Payload"):
        make_encoder("vfm_vae", weights=str(path), **kw)


def test_vfm_vae_missing_weights_and_wrong_tower(tmp_path, siglip_dir, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        make_encoder("vfm_vae")
    msg = str(err.value)
    for part in (V.CKPT_FILE, "tiancibi/VFM-VAE", "NON-COMMERCIAL", "google/siglip2-large-patch16-512",
                 "$WMLAB_WEIGHTS_DIR", "Apache-2.0", "weights=/path"):  # fmt: skip
        assert part in msg, (part, msg)
    with pytest.raises(FileNotFoundError, match="holds neither"):
        make_encoder("vfm_vae", weights=str(tmp_path), siglip_weights=str(siglip_dir))

    naflex = tmp_path / "naflex"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(naflex / "model.safetensors"))
    path = _save(tmp_path, _g_ema())
    with pytest.raises(ValueError, match="NaFlex"):
        make_encoder("vfm_vae", weights=str(path), siglip_weights=str(naflex))

    # found through $WMLAB_WEIGHTS_DIR in the HF repo layout
    wdir = tmp_path / "weights" / "tiancibi__VFM-VAE" / "checkpoints_imagenet256" / "vfm_vae"
    wdir.mkdir(parents=True)
    path.rename(wdir / V.CKPT_FILE)
    monkeypatch.setenv("WMLAB_WEIGHTS_DIR", str(tmp_path / "weights"))
    enc = make_encoder("vfm_vae", siglip_weights=str(siglip_dir), layers=[0, 1, -1], input_size=32)
    assert enc.info.weights == str(wdir / V.CKPT_FILE)


# ---------------------------------------------------------------------------------------------------
# DINO-Tok (reimplementation)


@pytest.fixture(scope="module")
def dinov2_dirs(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("dinov2")
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = Dinov2Config(hidden_size=C, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                              patch_size=14, mlp_ratio=2)  # fmt: skip
        Dinov2Model(config).save_pretrained(root / f"d{seed}")
        out[seed] = root / f"d{seed}"
    return out


TINY = dict(latent_dim=Z, input_size=32, proj_hidden=64, decoder_channel=32, batch_size=8, lr=2e-3,
            progress=False, device="cpu")  # fmt: skip


def test_dino_tok_trains_saves_loads(tiny_store, dinov2_dirs, tmp_path):
    from wmlab.training.tokenizer import train_tokenizer

    out = train_tokenizer(tiny_store.path, tmp_path / "tok", dinov2_weights=str(dinov2_dirs[0]), steps=30,
                          save_every=10, **TINY)  # fmt: skip
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["step"] == 30 and meta["config"]["shallow_layer"] == 1 and meta["config"]["deep_layer"] == -1
    assert meta["dinov2"]["sha256"] == W.weights_sha256(dinov2_dirs[0])
    val = [h["val_mse"] for h in meta["history"]]
    assert [h["step"] for h in meta["history"]] == [0, 10, 20, 30]
    assert val[-1] < 0.7 * val[0], val  # reconstruction improves over 30 steps

    enc = make_encoder("dino_tok", weights=str(out))
    assert (enc.num_tokens, enc.dim, enc.grid, enc.input_size) == (
        4,
        Z,
        (2, 2),
        28,
    )  # 32 px -> 2x2, DINOv2 at 28
    assert enc.frozen and all(not p.requires_grad for p in enc.parameters())
    frames = tiny_store.frames(int(tiny_store.committed[0]), [0, 5, 9])  # (3, 32, 32, 3) uint8
    tokens = enc.encode(frames)
    assert tokens.shape == (3, 4, Z) and torch.isfinite(tokens).all()
    torch.testing.assert_close(enc.encode(frames), tokens, atol=0, rtol=0)
    assert enc.decode(tokens).shape == (3, 3, 32, 32)
    assert enc.info.weights_sha256 == W.weights_sha256(out / "tokenizer.safetensors")
    assert enc.info.extra["reimplementation_of"].startswith("DINO-Tok")
    assert make_encoder("dino_tok", weights=str(out / "tokenizer.json")).info.weights == str(out)
    with pytest.raises(ValueError, match="not the ones"):
        make_encoder("dino_tok", weights=str(out), dinov2_weights=str(dinov2_dirs[1]))
    with pytest.raises(ValueError, match="another config"):
        train_tokenizer(tiny_store.path, out, dinov2_weights=str(dinov2_dirs[0]), steps=40,
                        **{**TINY, "latent_dim": 16})  # fmt: skip


def test_dino_tok_resume_is_exact(tiny_store, dinov2_dirs, tmp_path):
    from safetensors.torch import load_file

    from wmlab.training.tokenizer import train_tokenizer

    kw = dict(dinov2_weights=str(dinov2_dirs[0]), save_every=5, **TINY)
    straight = train_tokenizer(tiny_store, tmp_path / "straight", steps=10, **kw)
    resumed = train_tokenizer(tiny_store, tmp_path / "resumed", steps=5, **kw)
    assert json.loads((resumed / "tokenizer.json").read_text())["step"] == 5
    train_tokenizer(tiny_store, resumed, steps=10, **kw)
    meta = json.loads((resumed / "tokenizer.json").read_text())
    assert meta["step"] == 10 and [h["step"] for h in meta["history"]] == [0, 5, 10]
    a, b = (
        load_file(str(straight / "tokenizer.safetensors")),
        load_file(str(resumed / "tokenizer.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_dino_tok_missing_weights_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"wmlab train-tokenizer data="):
        make_encoder("dino_tok")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.safetensors.*wmlab train-tokenizer"):
        make_encoder("dino_tok", weights=str(tmp_path / "nope"))
    with pytest.raises(NotImplementedError, match="not public"):
        make_encoder("dino_tok", weights="official:/somewhere/dino_tok.pth")


# ---------------------------------------------------------------------------------------------------
# real weights (skipped unless $WMLAB_WEIGHTS_DIR holds them)


@pytest.mark.slow
def test_vfm_vae_real_weights(monkeypatch):
    root = Path(REAL_WEIGHTS_DIR) if REAL_WEIGHTS_DIR else None
    ckpts = [root / V.CKPT_FILE, root / "tiancibi__VFM-VAE" / V.CKPT_PATH_IN_REPO] if root else []
    if not any(p.is_file() for p in ckpts) or not (root / "google__siglip2-large-patch16-512").is_dir():
        pytest.skip("$WMLAB_WEIGHTS_DIR lacks the VFM-VAE checkpoint or google__siglip2-large-patch16-512")
    monkeypatch.setenv("WMLAB_WEIGHTS_DIR", REAL_WEIGHTS_DIR)
    enc = make_encoder("vfm_vae")
    tokens = enc.encode(_frames(2, 224))
    assert tokens.shape == (2, 196, Z) and torch.isfinite(tokens).all()
    torch.testing.assert_close(enc.encode(_frames(2, 224)), tokens)
