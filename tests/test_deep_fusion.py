"""--fusion deep (FuseDiT) beyond the DiT contract (tests/test_dit_contract.py): text keys/values equal the frozen
LLM's own, the text side is independent of the image, frozen weights, the LLM identity through save/load,
cache checks, and a short training run."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from semroute.shared.errors import FingerprintMismatch, SemrouteError
from semroute.shared.fingerprint import folder_weights_sha256
from semroute.shared.llm import load_llm
from semroute.shared.text_store import TextCacheReader
from semroute.shared.text_encoder import PromptFormat, TextEncoder
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.deep_fusion import DeepFusionDiT
from testkit import perturb, random_captions, save_tiny_llm, text_batch, write_manifest

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

# Post-RoPE keys and values each LLM attention module attends with, captured by an attention function
# registered with transformers (the hook point that sees exactly what goes into the softmax).
CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    CAPTURED[module.layer_idx] = (key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("semroute_capture", _capture_attention)


def save_llm(folder, arch: str, layers: int = 6, shard: bool = False, **config_overrides):
    """A tiny random LLM whose norm weights are not all 1 (a skipped norm would go unnoticed otherwise)."""
    save_tiny_llm(folder, arch, layers=layers)
    config = AutoConfig.from_pretrained(folder)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for stale in folder.glob("model*.safetensors"):  # save_tiny_llm's weights; transformers would prefer them
        stale.unlink()
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    return folder


def tiny(**overrides) -> DeepFusionDiT:
    torch.manual_seed(0)
    model = DeepFusionDiT.from_preset("tiny", **overrides).eval()
    perturb(model)
    return model


def record_safetensors_reads(monkeypatch, folder) -> list[str]:
    """The names of the tensors read through ``safetensors.safe_open`` from now on (until ``monkeypatch.undo()``)."""
    from safetensors import safe_open

    read = []
    handle_type = type(safe_open(str(next(folder.glob("*.safetensors"))), framework="pt"))
    original = handle_type.get_tensor
    monkeypatch.setattr(handle_type, "get_tensor", lambda self, key: read.append(key) or original(self, key))
    return read


def record_layer_inputs(decoder) -> dict[int, torch.Tensor]:
    """The hidden state entering decoder module ``layers[k]`` at the next forward, by k."""
    inputs = {}

    def hook(k, args, kwargs):
        inputs[k] = args[0] if args else kwargs["hidden_states"]

    for k, layer in enumerate(decoder.layers):
        layer.register_forward_pre_hook(lambda module, args, kwargs, k=k: hook(k, args, kwargs), with_kwargs=True)
    return inputs


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_llm(tmp_path_factory.mktemp("llm") / "qwen3-6", "qwen3")


# --------------------------------------------------------------------------------------------------
# The text side is the LLM's own
# --------------------------------------------------------------------------------------------------

LLM_CASES = {
    # Qwen3: per-head k_norm; every layer paired, from the embedding output hidden_states[0] on.
    "qwen3-all-layers": dict(arch="qwen3", first=0, blocks=6),
    # Llama with k/v biases, llama3 RoPE frequencies and a sharded checkpoint; the top layers paired.
    "llama-bias-llama3rope-sharded": dict(
        arch="llama", first=2, blocks=4, shard=True, attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
}


@pytest.mark.parametrize("case", list(LLM_CASES))
def test_text_kv_from_the_cache_equal_the_llms_own(case, tmp_path, monkeypatch):
    """Encode a text cache of the paired layers, build the model from the LLM folder, and compare the text
    keys/values computed from the cache with those the LLM attends with in its own forward pass (hooked),
    for every paired layer. Also pins the numbering: hidden_states[k] is the input of decoder module layers[k]."""
    spec = dict(LLM_CASES[case])
    arch, first, blocks, shard = spec.pop("arch"), spec.pop("first"), spec.pop("blocks"), spec.pop("shard", False)
    folder = save_llm(tmp_path / "llm", arch, shard=shard, **spec)
    assert (folder / "model.safetensors.index.json").exists() == shard

    # Only the paired layers' attention tensors are read from the checkpoint.
    read_keys = record_safetensors_reads(monkeypatch, folder)
    model = DeepFusionDiT.from_llm(str(folder), preset="tiny", first=first, num_blocks=blocks).eval()
    monkeypatch.undo()
    paired = [f"model.layers.{k}." for k in range(first, first + blocks)]
    assert read_keys and all(any(key.startswith(p) for p in paired) for key in read_keys)
    assert all("q_proj" not in key and "mlp" not in key for key in read_keys)
    assert model.text_layers == list(range(first, first + blocks))
    assert model.config.llm_qk_norm == (arch == "qwen3") and model.config.llm_attention_bias == (arch == "llama")

    # The text cache, with exactly the paired layers, read back and gathered as training does.
    records = random_captions(5, seed=3)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    cfg = EncodeTextConfig(data=str(manifest), out=str(tmp_path / "c.text.zarr"), llm=str(folder), progress=False,
                           device="cpu", dtype="float32", layers=f"{first}-{first + blocks - 1}")
    encode_text(cfg)
    reader = TextCacheReader(cfg.out)
    positions = model.check_text_cache(reader.fingerprint)
    rows = [0, 1, 2, 3]
    features, mask = reader.batch(rows)
    features = features[:, :, positions]
    assert mask.sum(1).unique().numel() > 1  # really padded
    kv = model.prepare_text(features, mask).kv

    # The LLM itself on the same right-padded token batch, hooked.
    llm = load_llm(str(folder), device="cpu", dtype="float32")
    encoder = TextEncoder(llm, PromptFormat(), model.text_layers)
    index = reader.index
    token_ids = [t.ids for t in encoder.tokenize([index.column("text")[i].as_py() for i in rows])]
    assert [len(t) for t in token_ids] == [index.column("n_tokens")[i].as_py() for i in rows]
    layer_inputs = record_layer_inputs(llm.decoder)
    llm.decoder.set_attn_implementation("semroute_capture")
    CAPTURED.clear()
    encoder.forward(token_ids)
    for i, k in enumerate(model.text_layers):
        key, value = kv[i]
        llm_key, llm_value = CAPTURED[k]
        for b, n in enumerate(mask.sum(1).tolist()):  # real tokens only: pads are masked on both sides
            torch.testing.assert_close(features[b, :n, i], layer_inputs[k][b, :n])  # hidden_states[k] = input of layers[k]
            torch.testing.assert_close(key[b, :, :n], llm_key[b, :, :n], msg=lambda m, k=k: f"keys of LLM layer {k}: {m}")
            torch.testing.assert_close(value[b, :, :n], llm_value[b, :, :n], msg=lambda m, k=k: f"values of LLM layer {k}: {m}")


@pytest.mark.smollm2
def test_real_smollm2_gguf_pairing(smollm2_llm):
    """SmolLM2 (GGUF, 30 layers) through a loaded LLM: 6 blocks centred on layers 12..17, keys equal the LLM's."""
    model = DeepFusionDiT.from_llm(smollm2_llm, preset="small").eval()
    assert model.text_layers == list(range(12, 18)) and model.config.text_dim == 576
    assert model.config.llm_weights_sha256 == smollm2_llm.identity["weights_sha256"]
    encoder = TextEncoder(smollm2_llm, PromptFormat(), model.text_layers)
    ids = [t.ids for t in encoder.tokenize([" a red circle", " three yellow stars above a small house"])]
    previous = smollm2_llm.decoder.config._attn_implementation
    smollm2_llm.decoder.set_attn_implementation("semroute_capture")
    try:
        CAPTURED.clear()
        features, mask = encoder.forward(ids)
    finally:
        smollm2_llm.decoder.set_attn_implementation(previous)
    kv = model.prepare_text(features, mask).kv
    n = len(ids[0])
    for i, k in enumerate(model.text_layers):
        torch.testing.assert_close(kv[i][0][:, :, :n], CAPTURED[k][0][:, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kv[i][1][:, :, :n], CAPTURED[k][1][:, :, :n], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Attention structure
# --------------------------------------------------------------------------------------------------


def test_text_side_does_not_depend_on_the_image():
    """The text keys/values each block attends to are the same whatever the image (text never sees image tokens)."""
    model = tiny()
    features, mask = text_batch(model, [4, 7])
    expected = model.prepare_text(features, mask).kv
    for seed in (0, 1):
        seen = []
        hooks = [block.attn.register_forward_pre_hook(lambda mod, args: seen.append((args[2], args[3])))
                 for block in model.blocks]
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * (1 + 10 * seed)
        model(latents, torch.tensor([100.0, 900.0]), features, mask)
        for hook in hooks:
            hook.remove()
        assert len(seen) == len(expected)
        for (key, value), (k_ref, v_ref) in zip(seen, expected):
            assert torch.equal(key, k_ref) and torch.equal(value, v_ref)


def test_left_padded_text_is_refused():
    model = tiny()
    features, mask = text_batch(model, [3, 5])
    with pytest.raises(SemrouteError, match="right-padded"):
        model.prepare_text(features, mask.flip(1))


# --------------------------------------------------------------------------------------------------
# Frozen weights, save/load, cache checks
# --------------------------------------------------------------------------------------------------


def test_frozen_llm_weights_get_no_gradient():
    model = tiny().train()
    frozen = {name for name, p in model.named_parameters() if name.startswith("llm_layers.")}
    assert frozen and all(not p.requires_grad for name, p in model.named_parameters() if name in frozen)
    by_flag = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in by_flag} == {id(p) for p in model.trainable_parameters()}
    features, mask = text_batch(model, [3, 5])
    model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), features, mask).sample.square().mean().backward()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_llm_weights_and_identity_survive_save_and_load(qwen_dir, tmp_path):
    model = DeepFusionDiT.from_llm(str(qwen_dir), preset="tiny").eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = DeepFusionDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.fusion == "deep" and loaded.text_layers == model.text_layers == [2, 3]
    # The frozen LLM weights travel with the model, still frozen; the identity is the text cache's.
    assert all(torch.equal(a, b) for a, b in zip(loaded.llm_layers.state_dict().values(), model.llm_layers.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.llm_layers.parameters())
    assert loaded.config.llm_weights_sha256 == folder_weights_sha256(qwen_dir) == load_llm(str(qwen_dir), device="cpu").identity["weights_sha256"]
    features, mask = text_batch(model, [3, 6])
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 600.0])
    assert torch.equal(loaded(latents, t, features, mask).sample, model(latents, t, features, mask).sample)


def test_cache_without_the_paired_layers_or_from_another_llm_is_refused(qwen_dir):
    model = DeepFusionDiT.from_llm(str(qwen_dir), preset="tiny", first=3)  # reads hidden_states 3, 4
    assert model.layer_positions([1, 2, 3, 4, 5, 6]) == [2, 3]
    with pytest.raises(SemrouteError, match=r"missing: \[4\].*--layers 3-4"):
        model.layer_positions([1, 2, 3, 5, 6])
    fingerprint = {"llm_weights_sha256": model.config.llm_weights_sha256, "llm_num_hidden_layers": 6,
                   "llm_hidden_size": 32, "layers": [3, 4]}
    assert model.check_text_cache(fingerprint) == [0, 1]
    with pytest.raises(FingerprintMismatch, match="llm_weights_sha256: cache has 'beef'"):
        model.check_text_cache({**fingerprint, "llm_weights_sha256": "beef"})
    with pytest.raises(SemrouteError, match="missing: \\[3\\]"):
        model.check_text_cache({**fingerprint, "layers": [4, 5]})


def test_pairing_must_fit_the_llm(qwen_dir):
    with pytest.raises(SemrouteError, match=r"needs layers 5\.\.6.*0\.\.5.*0 <= first <= 4"):
        DeepFusionDiT.from_llm(str(qwen_dir), preset="tiny", first=5)  # tiny has 2 blocks; 5 + 2 > 6
    with pytest.raises(SemrouteError, match="Use at most 4 blocks"):
        DeepFusionDiT.from_preset("tiny", num_blocks=5)
    # The reference's pairing by default: 24 blocks on a 36-layer LLM read layers 6..29 (tiny widths, paper depths).
    assert DeepFusionDiT.from_preset("tiny", num_blocks=24, llm_num_layers=36).text_layers == list(range(6, 30))
    with pytest.raises(SemrouteError, match="text_layers"):
        DeepFusionDiT.from_preset("tiny", text_layers=[1, 3])


def test_routing_weights_are_the_fixed_pairing():
    model = tiny()
    assert torch.equal(model.routing_weights(), torch.eye(2))
    assert model.routing_weights([0.1, 0.9]).shape == (2, 2, 2)
    summary = model.routing_summary()
    assert summary["top_layer"] == model.text_layers and summary["entropy"] == [0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_short_training_run_lowers_the_loss():
    """Rectified flow (docs/method.md: logit-normal sigma with shift 3, x_t = (1-s)x0 + s*eps, target eps - x0, MSE),
    plain AdamW on the trainable parameters, 100 steps on 8 caption-dependent latents: the loss on a fixed
    evaluation batch (fixed sigmas and noise) drops by more than half."""
    torch.manual_seed(0)
    model = DeepFusionDiT.from_preset("tiny")
    gen = torch.Generator().manual_seed(0)
    features, mask = text_batch(model, [3, 4, 5, 6, 3, 4, 5, 6], seed=1)
    x0 = torch.randn(8, 4, 1, 1, generator=gen).expand(8, 4, 8, 8) + 0.1 * torch.randn(8, 4, 8, 8, generator=gen)

    def loss_fn(sigma, eps):
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
        pred = model(x_t, 1000 * sigma, features, mask).sample
        return (pred - (eps - x0)).square().mean()

    def sample_sigma(g):
        sigma = torch.sigmoid(torch.randn(8, generator=g))
        return 3.0 * sigma / (1 + 2.0 * sigma)

    eval_gen = torch.Generator().manual_seed(123)
    eval_sigma, eval_eps = sample_sigma(eval_gen), torch.randn(8, 4, 8, 8, generator=eval_gen)
    with torch.no_grad():
        before = loss_fn(eval_sigma, eval_eps).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    train_gen = torch.Generator().manual_seed(7)
    for _ in range(100):
        loss = loss_fn(sample_sigma(train_gen), torch.randn(8, 4, 8, 8, generator=train_gen))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        after = loss_fn(eval_sigma, eval_eps).item()
    print(f"eval loss {before:.4f} -> {after:.4f} (ratio {after / before:.3f})")
    assert after < 0.5 * before, (before, after)


def test_build_for_a_text_cache_as_the_training_loop_does(qwen_dir):
    """``build_deep_model``: the LLM named by the cache's fingerprint, checked against it."""
    from types import SimpleNamespace

    from semroute.stage2_train.deep_fusion import build_deep_model

    cfg = SimpleNamespace(preset="tiny", deep_first_layer=1, text_layers=None)
    fingerprint = {"llm_ref": str(qwen_dir), "llm_weights_sha256": folder_weights_sha256(qwen_dir),
                   "llm_num_hidden_layers": 6, "llm_hidden_size": 32, "layers": [1, 2, 3]}
    model = build_deep_model(cfg, fingerprint, [1, 2, 3], {"in_channels": 4, "text_dim": 32, "llm_num_layers": 6})
    assert model.text_layers == [1, 2] and model.config.llm_ref == str(qwen_dir)
    with pytest.raises(FingerprintMismatch, match="llm_weights_sha256"):
        build_deep_model(cfg, {**fingerprint, "llm_weights_sha256": "0" * 64}, [1, 2, 3], {})
    with pytest.raises(SemrouteError, match="deep_first_layer instead of text_layers"):
        build_deep_model(SimpleNamespace(preset="tiny", deep_first_layer=None, text_layers=[1, 2]), fingerprint, [1, 2], {})
