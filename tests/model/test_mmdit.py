import contextlib
import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from model.tiny import make_inputs, tiny_config
from sd3.config_loader import load_config
from sd3.model import build_model
from sd3.model.flops import count_parameters, train_flops_per_image
from sd3.train import flow


def perturb_zero_init(model) -> None:
    """Give the zero-initialised modulation and output layers small random values, so a test sees a model whose
    blocks actually contribute (a fresh model is the identity plus a zero head by design)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("h, w", [(8, 8), (4, 12), (10, 6)], ids=["square", "wide", "tall"])
def test_output_shape_for_aspect_ratios(h, w):
    cfg = tiny_config()
    model = build_model(cfg)
    perturb_zero_init(model)
    x, t, context, pooled = make_inputs(cfg, 2, h, w)
    out = model(x, t, context, pooled)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("pos, mlp", [("absolute", "gelu"), ("NoPE", "swiglu"), ("RoPE2d", "gelu")])
def test_options_run(pos, mlp):
    cfg = tiny_config(positional_encoding=pos, mlp_type=mlp)
    model = build_model(cfg)
    x, t, context, pooled = make_inputs(cfg, 1, 6, 4)
    assert model(x, t, context, pooled).shape == x.shape


def test_bf16_weights_and_autocast_run():
    """Training runs fp32 weights under bf16 autocast; sampling may cast the whole model to bf16."""
    cfg = tiny_config()
    model = build_model(cfg)
    perturb_zero_init(model)
    x, t, context, pooled = make_inputs(cfg, 2, 4, 6)
    reference = model(x, t, context, pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x, t, context, pooled)
    pure = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), pooled.bfloat16())
    for out in (mixed, pure):
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.1)


def test_fresh_model_outputs_zero():
    """adaLN-Zero: the head and every gate start at zero, so the first prediction is exactly 0."""
    cfg = tiny_config()
    model = build_model(cfg)
    x, t, context, pooled = make_inputs(cfg, 2, 4, 4)
    assert torch.equal(model(x, t, context, pooled), torch.zeros_like(x))


@pytest.mark.parametrize("h, w, dim", [(5, 8, "height"), (8, 7, "width"), (3, 3, "height")])
def test_bad_sizes_name_the_dimension(h, w, dim):
    cfg = tiny_config()
    model = build_model(cfg)
    x, t, context, pooled = make_inputs(cfg, 1, h, w)
    with pytest.raises(ValueError, match=f"^{dim} {h * 8 if dim == 'height' else w * 8} px"):
        model(x, t, context, pooled)


def test_every_parameter_gets_a_gradient():
    """A fresh model is zero-initialised on purpose (adaLN-Zero), so gradients open up layer by layer: the first
    backward reaches only the head, the second the modulations, the third the image path, and the text stream's
    outputs only once its gates have moved. So take three real AdamW steps on a real loss, then check the fourth
    backward reaches every trainable parameter — the time scale and both text scalars included."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, context, pooled = make_inputs(cfg, 2, 4, 6)
    target = torch.randn_like(x)
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t, context, pooled), target).backward()
        if step == 0:
            assert model.head.weight.grad.abs().sum() > 0
            assert model.blocks[0].qkv_x.weight.grad is None or not model.blocks[0].qkv_x.weight.grad.any()
        if step < 3:
            opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    for name in ("time_embed.time_scale", "text_embed.0.scale", "text_embed.1.scale"):
        assert dict(model.named_parameters())[name].grad.abs() > 0


def test_initial_scalars():
    cfg = tiny_config()
    model = build_model(cfg)
    assert model.time_embed.time_scale.item() == 1000.0
    assert [part.scale.item() for part in model.text_embed] == pytest.approx([0.01, 0.01])
    tiny = build_model(dataclasses.replace(cfg, text_scale_init=1.0))  # the tiny-cpu preset's value
    assert [part.scale.item() for part in tiny.text_embed] == [1.0, 1.0]


def test_last_block_has_no_text_output_path():
    cfg = tiny_config()
    model = build_model(cfg)
    last, first = model.blocks[-1], model.blocks[0]
    assert last.out_c is None and last.mlp_c is None and last.q_norm_c is None
    assert last.qkv_c.out_features == 2 * cfg.dim and first.qkv_c.out_features == 3 * cfg.dim
    assert count_parameters(last) < count_parameters(first)


def test_bert_padding_columns_are_ignored():
    """The ModernBERT part is narrower than the context; its padding columns are sliced off, not projected."""
    cfg = tiny_config()
    model = build_model(cfg)
    perturb_zero_init(model)
    x, t, context, pooled = make_inputs(cfg, 2, 4, 4)
    noisy = context.clone()
    noisy[:, cfg.text_tokens :, cfg.text_dims[1] :] = 5.0
    torch.testing.assert_close(model(x, t, context, pooled), model(x, t, noisy, pooled))
    changed = context.clone()
    changed[:, cfg.text_tokens :, 0] += 1.0
    assert not torch.allclose(model(x, t, context, pooled), model(x, t, changed, pooled))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(tiny_config())
    perturb_zero_init(plain)
    ckpt = build_model(tiny_config(checkpoint_attn=True, checkpoint_mlp=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, context, pooled = make_inputs(plain.cfg, 2, 4, 4)
    for model in (plain, ckpt):
        model(x, t, context, pooled).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bad_context_shape_is_named():
    cfg = tiny_config()
    model = build_model(cfg)
    x, t, context, pooled = make_inputs(cfg, 1, 4, 4)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, context[:, :-1], pooled)


SWITCHES = [
    {"attention": "cosine"},
    {"positional_encoding": "RoPE"},
    {"positional_encoding": "RoPE2dV2"},
    {"kv_merge_attn": True},
    {"qk_half_dim": True},
    {"text_loss": True},
    {"time_embedding": "seed", "head_modulation": "seed", "rope_interpolate": False},
    {"attention": "cosine", "kv_merge_attn": True, "qk_half_dim": True, "positional_encoding": "RoPE2dV2"},
]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_trains_on_tiny_cpu(switch):
    """A few real AdamW steps of the tiny-cpu model with the switch on: finite losses, a falling loss, and (after
    the adaLN-Zero warm-up steps, see test_every_parameter_gets_a_gradient) a gradient in every parameter.
    With a text head the loss adds the masked text regression of sd3.train.flow (SEED_SPEC §e)."""
    cfg = dataclasses.replace(load_config("tiny-cpu").model, **switch)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, context, pooled = make_inputs(cfg, 2, 8, 8)
    target = torch.randn_like(x)
    mask = flow.text_loss_mask(torch.ones(2, 2, dtype=torch.bool), cfg.text_tokens, torch.Generator().manual_seed(0))
    losses = []
    for step in range(7):
        opt.zero_grad(set_to_none=True)
        if cfg.text_loss:
            v, text = model(x, t, flow.hide_text(context, mask), pooled, return_text=True)
            loss = flow.flow_loss(v, target) + 0.5 * flow.text_loss(text, context, mask)
        else:
            loss = flow.flow_loss(model(x, t, context, pooled), target)
        loss.backward()
        assert torch.isfinite(loss)
        losses.append(loss.item())
        if step < 6:
            opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_text_head_reads_the_last_blocks_text_stream():
    cfg = tiny_config(text_loss=True)
    model = build_model(cfg)
    assert all(b.out_c is not None and b.mlp_c is not None for b in model.blocks)  # the last block keeps text
    assert model.text_head.out_features == cfg.context_dim
    x, t, context, pooled = make_inputs(cfg, 2, 4, 4)
    v, text = model(x, t, context, pooled, return_text=True)
    assert v.shape == x.shape and text.shape == context.shape
    with pytest.raises(ValueError, match="model.text_loss"):
        build_model(tiny_config())(x, t, context, pooled, return_text=True)


def test_seed_head_and_time_embedding_have_the_sources_shapes():
    cfg = tiny_config(time_embedding="seed", head_modulation="seed")
    model = build_model(cfg)
    assert model.head_cond is None
    assert model.time_embed.proj.weight.shape == (cfg.dim, cfg.dim) and model.time_embed.proj.bias is None


BUCKETS = [(4, 4), (4, 6), (6, 4), (8, 8), (6, 8), (8, 6), (4, 8), (8, 4)]  # latent h, w: 8 bucket shapes


def test_gpu_ready_compiles_across_buckets_without_breaks_or_recompile_limit():
    """Issue 18 item 11: the RoPE tables are built once per forward outside the checkpointed blocks (a cache
    written inside them broke the graph at every new grid). dynamo: 0 graph breaks, and 8 bucket shapes plus a
    batch-size change stay under a recompile limit of 8 (automatic dynamic shapes after the first recompile)."""
    cfg = tiny_config(num_blocks=2, checkpoint_attn=True, checkpoint_mlp=True)
    model = build_model(cfg)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*make_inputs(cfg, 2, 4, 4))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        compiled = torch.compile(model, backend="eager")
        for i, (h, w) in enumerate(BUCKETS):
            compiled(*make_inputs(cfg, 2 + i % 2, h, w)).square().mean().backward()
    assert counters["stats"]["unique_graphs"] <= 3  # static, then dynamic; never one per shape
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_reference_size_runs_forward_and_backward_on_meta_and_fake_tensors(mode):
    """Issue 12's snag: `sd3 plan` counts FLOPs of the real-size MMDiT without weights. per_sample() used to open
    torch.autocast("meta"), which torch rejects; now the model builds and runs on meta and fake tensors."""
    cfg = load_config("sd3-1b-256").model
    B, T = 1, cfg.text_tokens
    with contextlib.ExitStack() as stack:
        device = "meta" if mode == "meta" else "cpu"
        stack.enter_context(torch.device("meta") if mode == "meta" else FakeTensorMode())
        model = build_model(cfg)
        x = torch.randn(B, cfg.in_channels, 32, 32, device=device)
        context = torch.randn(B, 2 * T, cfg.context_dim, device=device)
        t, pooled = torch.rand(B, device=device), torch.randn(B, cfg.pooled_dim, device=device)
        with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, context, pooled)
            out.float().square().mean().backward()
        assert out.shape == x.shape
        assert model.blocks[0].qkv_x.weight.grad.shape == model.blocks[0].qkv_x.weight.shape
    # Within a factor of the closed-form estimate (the counter also sees checkpoint recomputes and SDPA details).
    estimate = train_flops_per_image(cfg, 256, 256)
    assert 0.5 * estimate < counter.get_total_flops() < 2 * estimate
