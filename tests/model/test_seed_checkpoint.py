"""`sd3 import-seed`: a state_dict with the source's names and shapes (SEED_SPEC §g, random values, small sizes),
converted, must run in our MMDiT exactly like the source's maths — written here from the spec, independently of
sd3's code — within 1e-4 in fp32."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sd3.cli import main
from sd3.config_loader import config_from_dict
from sd3.model import build_model
from sd3.model.seed_checkpoint import SeedCheckpointError, convert, model_config
from sd3.sample.checks import find_checkpoint
from sd3.sample.pipeline import build_in_dtype, load_weights

D, H, BLOCKS, C, P, POOLED, GEMMA, BERT, T = 32, 2, 3, 4, 2, 6, 2304, 1024, 77
HIDDEN = 4 * D


def params(**changes):
    base = {"inCh": C, "class_dim": POOLED, "patch_size": P, "dim": D, "hidden_scale": 4.0, "num_heads": H,
            "attn_type": "softmax_flash", "MLP_type": "swiglu", "num_blocks": BLOCKS, "positional_encoding": "RoPE2d",
            "max_res_orig": 256, "max_res": 512, "kv_merge_attn": False, "qk_half_dim": False, "text_loss": False,
            "device": "cpu", "start_step": 7000, "wandb_id": "abc"}
    return {**base, **changes}


def source_state_dict(attn="softmax", text_loss=False, seed=0):
    """The source's keys and shapes (SEED_SPEC §g table) with random values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=None):
        std = std if std is not None else 1 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * std

    dh = D // H
    sd = {"time_scale": torch.tensor([1000.0]), "learnable_scalar": torch.tensor([0.7]),
          "learnable_scalar2": torch.tensor([1.3]), "t_emb2.weight": rand(D, D), "cond_MLP.weight": rand(D, POOLED),
          "pre_c_norm.weight": 1 + rand(GEMMA, std=0.1), "pre_c_norm2.weight": 1 + rand(GEMMA, std=0.1),
          "c_proj.weight": rand(D, GEMMA), "c_proj2.weight": rand(D, GEMMA),
          "pos_enc.proj.weight": rand(D, C, P, P, std=0.3), "patch_emb.weight": rand(D, D), "patch_emb.bias": rand(D),
          "out_norm.c_shift.weight": rand(D, D), "out_norm.c_scale.weight": rand(D, D, std=0.05),
          "out_proj.weight": rand(C * P * P, D), "out_proj.bias": rand(C * P * P)}
    for i in range(BLOCKS):
        last = i == BLOCKS - 1 and not text_loss
        b = f"blocks.{i}"
        sd[f"{b}.y_proj.0.weight"], sd[f"{b}.y_proj.0.bias"] = rand(D, D), rand(D)
        for s in ("x", "c"):
            full = s == "x" or not last
            for n in ("query", "key", "value") + (("out",) if full else ()):
                sd[f"{b}.attn.{n}_proj_{s}.weight"] = rand(D, D)
            if attn == "softmax":
                for n in ("q", "k"):
                    sd[f"{b}.attn.{n}_norm_{s}.weight"] = 1 + rand(dh, std=0.1)
            for norm in ("norm1",) + (("norm2",) if full else ()):
                sd[f"{b}.{norm}_{s}.c_shift.weight"] = rand(D, D, std=0.05)
                sd[f"{b}.{norm}_{s}.c_scale.weight"] = rand(D, D, std=0.05)
            if full:
                sd[f"{b}.scale1_{s}.weight"], sd[f"{b}.scale2_{s}.weight"] = rand(D, D), rand(D, D)
                mlp = f"{b}.MLP_{s}.MLP"  # xformers SwiGLU: w12 rows [0:hidden] on the SiLU side
                sd[f"{mlp}.w12.weight"], sd[f"{mlp}.w12.bias"] = rand(2 * HIDDEN, D), rand(2 * HIDDEN)
                sd[f"{mlp}.w3.weight"], sd[f"{mlp}.w3.bias"] = rand(D, HIDDEN), rand(D)
        sd[f"{b}.attn.rotary_emb.freqs"] = 10000 ** (-torch.arange(dh // 4) / (dh // 4))
        if attn == "cosine":
            sd[f"{b}.attn.norm_const"] = rand(1, H, 1, 1, std=0.5)
    if text_loss:
        sd["out_text_proj.weight"], sd["out_text_proj.bias"] = rand(GEMMA, D), rand(GEMMA)
    return sd


# ------------------------------------------------------------------ the source's maths, from SEED_SPEC §a, §b, §g


# The source's norm eps: nn.RMSNorm's default finfo.eps and nn.LayerNorm's 1e-5 (ours: 1e-6 both). A test may set
# ours to see the mapping itself exact to fp32 rounding, with the eps difference taken out.
EPS = {"rms": None, "layer": 1e-5}


def rms(x, w):
    eps = torch.finfo(x.dtype).eps if EPS["rms"] is None else EPS["rms"]
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def ada(x, sd, name, y):  # LayerNorm (no affine) · (1 + c_scale(y)) + c_shift(y)
    x = F.layer_norm(x, x.shape[-1:], eps=EPS["layer"])
    return x * (1 + lin(sd, f"{name}.c_scale", y)[:, None]) + lin(sd, f"{name}.c_shift", y)[:, None]


def rope2d_interleaved(x, h, w):
    """x (B, H, N, d): first d/2 channels rotate with the row, the rest with the column, pairs (2i, 2i+1)."""
    d = x.shape[-1]
    freqs = 10000 ** (-torch.arange(d // 4, dtype=torch.float32) / (d // 4))
    rows, cols = torch.arange(h).repeat_interleave(w).float(), torch.arange(w).repeat(h).float()
    angle = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1).repeat_interleave(2, dim=-1)  # (N, d)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)  # (-x[2i+1], x[2i])
    return x * angle.cos() + rotated * angle.sin()


def source_forward(sd, x, t, context, pooled, attn="softmax"):
    B, _, hl, wl = x.shape
    hp, wp = hl // P, wl // P
    dh = D // H
    a = (t * sd["time_scale"])[:, None] / 10000 ** (2 * torch.arange(D) / D)  # (B, D)
    y = lin(sd, "t_emb2", torch.cat([a[:, 0::2].sin(), a[:, 1::2].cos()], -1)) + lin(sd, "cond_MLP", pooled)
    gemma, bert = context[:, :T], torch.cat([context[:, T:, :BERT], torch.zeros(B, T, GEMMA - BERT)], -1)
    c = torch.cat([lin(sd, "c_proj", rms(gemma, sd["pre_c_norm.weight"]) * sd["learnable_scalar"]),
                   lin(sd, "c_proj2", rms(bert, sd["pre_c_norm2.weight"]) * sd["learnable_scalar2"])], 1)
    img = F.conv2d(x, sd["pos_enc.proj.weight"], stride=P).flatten(2).transpose(1, 2)
    img = lin(sd, "patch_emb", img)
    N = img.shape[1]
    for i in range(BLOCKS):
        b = f"blocks.{i}"
        last = f"{b}.attn.out_proj_c.weight" not in sd
        yb = F.silu(lin(sd, f"{b}.y_proj.0", y))
        xn, cn = ada(img, sd, f"{b}.norm1_x", yb), ada(c, sd, f"{b}.norm1_c", yb)

        def proj(name, s, b=b):
            return lin(sd, f"{b}.attn.{name}", s).view(B, -1, H, dh).transpose(1, 2)  # (B, H, S, dh)

        q = [proj("query_proj_x", xn), proj("query_proj_c", cn)]
        k = [proj("key_proj_x", xn), proj("key_proj_c", cn)]
        v = [proj("value_proj_x", xn), proj("value_proj_c", cn)]
        if attn == "softmax":
            q = [rms(q[0], sd[f"{b}.attn.q_norm_x.weight"]), rms(q[1], sd[f"{b}.attn.q_norm_c.weight"])]
            k = [rms(k[0], sd[f"{b}.attn.k_norm_x.weight"]), rms(k[1], sd[f"{b}.attn.k_norm_c.weight"])]
        else:
            q, k = [F.normalize(z, dim=-1) for z in q], [F.normalize(z, dim=-1) for z in k]
        q[0], k[0] = rope2d_interleaved(q[0], hp, wp), rope2d_interleaved(k[0], hp, wp)
        qa, ka, va = torch.cat(q, 2), torch.cat(k, 2), torch.cat(v, 2)
        if attn == "softmax":
            o = torch.softmax(qa @ ka.transpose(-1, -2) * dh**-0.5, -1) @ va
        else:
            o = qa @ (ka.transpose(-1, -2) @ (va / ka.shape[2] ** torch.sigmoid(sd[f"{b}.attn.norm_const"])))
        o = o.transpose(1, 2).flatten(2)  # (B, S, D)
        img = img + lin(sd, f"{b}.scale1_x", yb)[:, None] * lin(sd, f"{b}.attn.out_proj_x", o[:, :N])

        def mlp(s, z, b=b):
            x1, x2 = lin(sd, f"{b}.MLP_{s}.MLP.w12", z).chunk(2, -1)
            return lin(sd, f"{b}.MLP_{s}.MLP.w3", F.silu(x1) * x2)

        img = img + lin(sd, f"{b}.scale2_x", yb)[:, None] * mlp("x", ada(img, sd, f"{b}.norm2_x", yb))
        if not last:
            c = c + lin(sd, f"{b}.scale1_c", yb)[:, None] * lin(sd, f"{b}.attn.out_proj_c", o[:, N:])
            c = c + lin(sd, f"{b}.scale2_c", yb)[:, None] * mlp("c", ada(c, sd, f"{b}.norm2_c", yb))
    out = lin(sd, "out_proj", ada(img, sd, "out_norm", y))  # (B, N, C·p·p), channel index c·p² + ph·p + pw
    out = out.view(B, hp, wp, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, C, hl, wl)
    text = lin(sd, "out_text_proj", c) if "out_text_proj.weight" in sd else None
    return out, text


def inputs(seed=1, batch=2, h=8, w=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, h, w, generator=g)
    context = torch.randn(batch, 2 * T, GEMMA, generator=g)
    context[:, T:, BERT:] = 0  # the BERT part is zero-padded to the Gemma width
    return x, torch.rand(batch, generator=g), context, torch.randn(batch, POOLED, generator=g)


@pytest.mark.parametrize("attn, text_loss", [("softmax", False), ("cosine", False), ("softmax", True)])
def test_converted_model_equals_the_sources_maths(attn, text_loss):
    sd = source_state_dict(attn, text_loss)
    cfg = model_config(params(attn_type="softmax_flash" if attn == "softmax" else attn, text_loss=text_loss))
    assert cfg.rope_interpolate is False and cfg.max_res == 512  # the source's RoPE2d ignores max_res
    model = build_model(cfg)
    model.load_state_dict(convert(sd, cfg), strict=True)
    x, t, context, pooled = inputs()
    with torch.no_grad():
        ours = model(x, t, context, pooled, return_text=text_loss)
        reference, text = source_forward(sd, x, t, context, pooled, attn)
    ours, ours_text = ours if text_loss else (ours, None)
    assert reference.abs().mean() > 0.1  # a real signal, not a vanishing one
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    if text_loss:  # 2304 outputs up to ~8: the eps differences show at ~1e-4, so compare with ours taken out
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setitem(EPS, "rms", 1e-6)
            patch.setitem(EPS, "layer", 1e-6)
            reference, text = source_forward(sd, x, t, context, pooled, attn)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_text, text, atol=1e-4, rtol=0)


def test_unknown_and_leftover_source_tensors_are_named():
    sd = source_state_dict()
    cfg = model_config(params())
    with pytest.raises(SeedCheckpointError, match="no place in the converted model: extra.weight"):
        convert({**sd, "extra.weight": torch.zeros(1)}, cfg)
    del sd["blocks.0.y_proj.0.bias"]
    with pytest.raises(SeedCheckpointError, match="lacks 'blocks.0.y_proj.0.bias'"):
        convert(sd, cfg)
    with pytest.raises(SeedCheckpointError, match="positional_encoding 'absolute' is not converted"):
        model_config(params(positional_encoding="absolute"))


def write_source_files(tmp_path, sd=None):
    weights, params_file = tmp_path / "model_ema_7000s.pkl", tmp_path / "model_params_7000s.json"
    torch.save(source_state_dict() if sd is None else sd, weights)
    params_file.write_text(json.dumps(params()))
    return weights, params_file


def test_import_seed_writes_a_checkpoint_the_sampler_loads(tmp_path, capsys):
    weights, params_file = write_source_files(tmp_path)
    out = tmp_path / "converted"
    assert main(["import-seed", "--weights", str(weights), "--params", str(params_file), "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["step"] == 7000
    path = find_checkpoint(out)  # what `sd3 sample --checkpoint` does, then its model and weight loading
    cfg = config_from_dict(json.loads((path / "config.json").read_text()))
    assert cfg.encoders.latent_norm == "seed" and cfg.model.time_embedding == "seed"
    model = build_in_dtype(cfg, torch.device("cpu"), torch.float32)
    load_weights(model, path / "ema.safetensors")
    x, t, context, pooled = inputs()
    with torch.no_grad():
        reference, _ = source_forward(source_state_dict(), x, t, context, pooled)
        torch.testing.assert_close(model(x, t, context, pooled), reference, atol=1e-4, rtol=0)


def test_import_seed_refuses_anything_but_a_plain_state_dict(tmp_path, capsys):
    weights, params_file = write_source_files(tmp_path)
    torch.save(torch.nn.Linear(2, 2), weights)  # a pickled module: weights_only refuses it
    argv = ["import-seed", "--weights", str(weights), "--params", str(params_file), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sd3 import-seed: error: --weights")
    assert "plain state_dict" in err
    torch.save([torch.zeros(1)], weights)
    assert main(argv) == 2
    assert "not a plain state_dict of tensors (got list)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
