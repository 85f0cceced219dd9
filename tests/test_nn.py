"""based.nn layers: each against an independent formula, and decoding (token by token or in uneven
chunks, through the layer's cache) against the parallel forward at every position."""
import math

import pytest
import torch
import torch.nn.functional as F

from based.nn import (BaseConv, Block, GatedMlp, LinearAttention, RMSNorm, SlidingWindowAttention,
                      SlidingWindowCache, apply_rotary)
from based.nn.rotary import rotated_qkv, token_positions
from based.ops import LinearAttentionState
from tests.helpers import assert_close

D_MODEL, HEADS, BATCH, SEQLEN = 64, 4, 2, 29
CHUNKINGS = {
    "one token at a time": [1] * SEQLEN,
    "uneven chunks": [3, 1, 7, 1, 1, 16],
    "prompt then tokens": [20] + [1] * 9,
}

LAYERS = {
    "linear_attention": lambda: LinearAttention(D_MODEL, num_heads=HEADS, feature_dim=8),
    "sliding_window_1": lambda: SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=1),
    "sliding_window_5": lambda: SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=5),
    "sliding_window_longer_than_seq": lambda: SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=64),
    "sliding_window_without_rotary": lambda: SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=5,
                                                                    rotary_base=None),
    "base_conv": lambda: BaseConv(D_MODEL, expand_proj=4, kernel_size=3),
    "block_with_linear_attention": lambda: Block(D_MODEL, LinearAttention(D_MODEL, num_heads=HEADS, feature_dim=8),
                                                 GatedMlp(D_MODEL, 2 * D_MODEL)),
    "block_with_sliding_window": lambda: Block(D_MODEL, SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=6),
                                               GatedMlp(D_MODEL, 2 * D_MODEL)),
    "block_with_base_conv": lambda: Block(D_MODEL, BaseConv(D_MODEL), GatedMlp(D_MODEL, 2 * D_MODEL)),
}


def randomized(layer: torch.nn.Module, dtype=torch.float32) -> torch.nn.Module:
    """Random weights everywhere (norm weights and biases included), so no term can hide behind a 0 or 1."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return layer.to(dtype)


def decode_in_chunks(layer, x, chunks):
    cache = layer.new_cache(x.shape[0], x.shape[1])
    outputs, start = [], 0
    for length in chunks:
        outputs.append(layer(x[:, start:start + length], cache))
        start += length
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("batch", [1, BATCH])  # batch 1 decodes single rows: blocks fuse their norms then
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("name", LAYERS)
@torch.no_grad()
def test_decoding_matches_parallel_forward(name, chunking, batch):
    torch.manual_seed(0)
    layer = randomized(LAYERS[name]())
    x = torch.randn(batch, SEQLEN, D_MODEL)
    decoded, _ = decode_in_chunks(layer, x, CHUNKINGS[chunking])
    assert_close(decoded, layer(x), torch.float32, f"{name}, {chunking}")


@pytest.mark.parametrize("name", ["linear_attention", "sliding_window_5", "base_conv"])
@torch.no_grad()
def test_decoding_in_bfloat16(name):
    torch.manual_seed(0)
    layer = randomized(LAYERS[name](), torch.bfloat16)
    x = torch.randn(BATCH, SEQLEN, D_MODEL, dtype=torch.bfloat16)
    decoded, _ = decode_in_chunks(layer, x, CHUNKINGS["uneven chunks"])
    assert decoded.dtype == torch.bfloat16
    assert_close(decoded, layer(x), torch.bfloat16, name)


# ---- each layer against a formula written here ------------------------------------------------------

def taylor_scores(q, k):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return 1 + s + s * s / 2


@torch.no_grad()
def test_linear_attention_formula():
    torch.manual_seed(1)
    layer = randomized(LinearAttention(D_MODEL, num_heads=HEADS, feature_dim=8), torch.float64)
    x = torch.randn(BATCH, SEQLEN, D_MODEL, dtype=torch.float64)
    heads = lambda t: t.view(BATCH, SEQLEN, HEADS, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(x @ layer.proj_q.weight.T), heads(x @ layer.proj_k.weight.T), heads(x @ layer.proj_v.weight.T)
    a = taylor_scores(q, k).tril()
    o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-12)
    expected = o.transpose(1, 2).reshape(BATCH, SEQLEN, D_MODEL) @ layer.out_proj.weight.T
    assert_close(layer(x), expected, torch.float64)


def rotary_by_complex_numbers(x, base=10000.0):
    """RoPE as a complex rotation: channel i pairs with channel i + D/2 (non-interleaved layout)."""
    T, D = x.shape[1], x.shape[-1]
    half = D // 2
    z = torch.complex(x[..., :half], x[..., half:])
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta
    z = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("window, rotary_base", [(1, 10000.0), (4, 10000.0), (100, 10000.0), (4, None), (100, None)])
@torch.no_grad()
def test_sliding_window_formula(window, rotary_base):
    """With `rotary_base=None` q and k are not rotated: attention without positions."""
    torch.manual_seed(2)
    layer = SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=window, rotary_base=rotary_base)
    layer = randomized(layer, torch.float64)
    x = torch.randn(BATCH, SEQLEN, D_MODEL, dtype=torch.float64)
    q, k, v = (x @ layer.Wqkv.weight.T).view(BATCH, SEQLEN, 3, HEADS, -1).unbind(2)
    if rotary_base is not None:
        q, k = rotary_by_complex_numbers(q), rotary_by_complex_numbers(k)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    i, j = torch.arange(SEQLEN)[:, None], torch.arange(SEQLEN)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(BATCH, SEQLEN, D_MODEL)
    assert_close(layer(x), o @ layer.out_proj.weight.T, torch.float64)


@torch.no_grad()
def test_base_conv_formula_is_the_released_conv1d():
    """The released BaseConv runs nn.Conv1d(groups=channels, padding=K-1) and keeps the first T outputs."""
    torch.manual_seed(3)
    layer = randomized(BaseConv(D_MODEL, expand_proj=4, kernel_size=3), torch.float64)
    x = torch.randn(BATCH, SEQLEN, D_MODEL, dtype=torch.float64)
    u = x @ layer.in_proj.weight.T + layer.in_proj.bias
    u1, u2 = u[..., :2 * D_MODEL], u[..., 2 * D_MODEL:]
    conv = F.conv1d(u1.transpose(1, 2), layer.conv.conv.weight, padding=2, groups=2 * D_MODEL)[..., :SEQLEN]
    expected = (F.silu(conv.transpose(1, 2)) * u2) @ layer.out_proj.weight.T + layer.out_proj.bias
    assert_close(layer(x), expected, torch.float64)


@torch.no_grad()
def test_mlp_norm_and_block_formulas():
    torch.manual_seed(4)
    mlp = randomized(GatedMlp(D_MODEL, 48), torch.float64)
    x = torch.randn(BATCH, SEQLEN, D_MODEL, dtype=torch.float64)
    hidden = x @ mlp.fc1.weight.T
    value, gate = hidden[..., :48], hidden[..., 48:]  # first half value, second half gate
    assert_close(mlp(x), (value * F.silu(gate)) @ mlp.fc2.weight.T, torch.float64, "mlp")

    norm = randomized(RMSNorm(D_MODEL, eps=1e-5), torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert_close(norm(x), expected, torch.float64, "rmsnorm")

    block = randomized(Block(D_MODEL, BaseConv(D_MODEL), GatedMlp(D_MODEL, 48)), torch.float64)
    after_mixer = x + block.mixer(block.norm1(x))
    assert_close(block(x), after_mixer + block.mlp(block.norm2(after_mixer)), torch.float64, "block")


@pytest.mark.parametrize("rows", [(1, 1), (2, 5)])
@pytest.mark.parametrize("name", ["linear_attention", "sliding_window_5", "base_conv", "mlp"])
@torch.no_grad()
def test_mixers_and_mlp_take_the_norm_before_and_the_residual_after(name, rows):
    """`layer(x, norm=n, residual=r) == r + layer(n(x))`, the blocks' single-row path (fused kernels on a GPU)."""
    torch.manual_seed(4)
    layer = randomized(GatedMlp(D_MODEL, 48) if name == "mlp" else LAYERS[name](), torch.float64)
    norm = randomized(RMSNorm(D_MODEL), torch.float64)
    x, residual = (torch.randn(*rows, D_MODEL, dtype=torch.float64) for _ in range(2))
    assert_close(layer(x, norm=norm, residual=residual), residual + layer(norm(x)), torch.float64, name)


@torch.no_grad()
def test_block_keeps_the_residual_in_float32():
    block = randomized(Block(D_MODEL, BaseConv(D_MODEL), GatedMlp(D_MODEL, 48)), torch.bfloat16)
    out = block(torch.randn(BATCH, 5, D_MODEL, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert block.norm1(out).dtype == torch.bfloat16


def test_rotary_matches_complex_rotation_and_depends_on_relative_position():
    torch.manual_seed(5)
    x = torch.randn(2, 11, 3, 16, dtype=torch.float64)
    rotated = apply_rotary(x, torch.arange(11))
    assert_close(rotated, rotary_by_complex_numbers(x), torch.float64)
    assert_close(rotated[:, 0], x[:, 0], torch.float64, "position 0 is the identity")
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    at = lambda t, p: apply_rotary(t.view(1, 1, 1, 16), torch.tensor([p]))[0, 0, 0]  # noqa: E731
    assert torch.allclose(at(q, 7) @ at(k, 3), at(q, 104) @ at(k, 100))


def test_rotated_qkv_splits_and_rotates_q_and_k_at_the_cache_position():
    torch.manual_seed(6)
    qkv = torch.randn(2, 5, 3 * 4 * 8, dtype=torch.float64)
    start = torch.tensor(3)
    q, k, v = rotated_qkv(qkv, 4, start, 10000.0)
    parts = qkv.view(2, 5, 3, 4, 8)
    positions = torch.arange(3, 8)
    assert_close(q, apply_rotary(parts[:, :, 0], positions), torch.float64)
    assert_close(k, apply_rotary(parts[:, :, 1], positions), torch.float64)
    assert torch.equal(v, parts[:, :, 2])


def test_a_decode_step_reads_its_position_from_the_cache_without_a_kernel():
    start = torch.tensor(41)
    positions = token_positions(1, start, start.device)
    assert positions.tolist() == [41] and positions.data_ptr() == start.data_ptr()
    assert token_positions(3, start, start.device).tolist() == [41, 42, 43]
    assert token_positions(3, None, start.device).tolist() == [0, 1, 2]


# ---- parameters, caches, errors ------------------------------------------------------------------------

def test_parameter_names_and_shapes_are_the_released_ones():
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(LinearAttention(D_MODEL, num_heads=HEADS, feature_dim=16)) == {
        "proj_q.weight": (64, 64), "proj_k.weight": (64, 64), "proj_v.weight": (64, 64), "out_proj.weight": (64, 64)}
    assert shapes(LinearAttention(128, num_heads=4, feature_dim=16))["proj_q.weight"] == (64, 128)
    assert shapes(SlidingWindowAttention(D_MODEL, num_heads=HEADS)) == {"Wqkv.weight": (192, 64),
                                                                        "out_proj.weight": (64, 64)}
    assert shapes(BaseConv(D_MODEL, expand_proj=4)) == {
        "in_proj.weight": (256, 64), "in_proj.bias": (256,), "conv.conv.weight": (128, 1, 3),
        "out_proj.weight": (64, 128), "out_proj.bias": (64,)}
    assert shapes(GatedMlp(D_MODEL, 128)) == {"fc1.weight": (256, 64), "fc2.weight": (64, 128)}
    block = Block(D_MODEL, BaseConv(D_MODEL), GatedMlp(D_MODEL, 128))
    assert {k.split(".")[0] for k in block.state_dict()} == {"norm1", "norm2", "mixer", "mlp"}


def test_cache_shapes_and_dtypes():
    la = LinearAttention(D_MODEL, num_heads=HEADS, feature_dim=8, dtype=torch.bfloat16).new_cache(3, 1000)
    assert isinstance(la, LinearAttentionState)
    assert la.kv.shape == (3, HEADS, 1 + 8 + 36, 16) and la.kv.dtype == torch.float32
    swa = SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=7).new_cache(3, 1000)
    assert isinstance(swa, SlidingWindowCache)
    assert swa.window.k.shape == (3, 7, HEADS, 16), "the ring buffer holds `window` positions, not max_seqlen"
    assert swa.position.shape == () and swa.position.dtype == torch.int64
    conv = BaseConv(D_MODEL).new_cache(3, 1000)
    assert conv.shape == (3, 128, 3) and conv.dtype == torch.float32


@pytest.mark.parametrize("name", ["linear_attention", "sliding_window_5", "base_conv"])
@torch.no_grad()
def test_a_shared_position_is_read_but_left_to_its_owner(name):
    """The Mixer protocol's `position`: a mixer that tracks positions reads the shared tensor and does not advance
    it (its owner does, once per step for all layers); given none, it keeps and advances its own. Mixers that need
    no position take the argument and ignore it. Decoding with the shared position advanced by hand matches the
    layer's own bookkeeping."""
    torch.manual_seed(0)
    layer = randomized(LAYERS[name]())
    x = torch.randn(1, 6, D_MODEL)
    position = torch.zeros((), dtype=torch.int64)
    shared, own = layer.new_cache(1, 6, position=position), layer.new_cache(1, 6)
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:]):
        assert torch.equal(layer(chunk, shared), layer(chunk, own))
        position.add_(chunk.shape[1])
    if isinstance(shared, SlidingWindowCache):
        assert shared.position is position and not shared.advance
        assert own.advance and int(own.position) == 6


@pytest.mark.parametrize("name", ["linear_attention", "sliding_window_5", "base_conv"])
def test_bad_inputs(name):
    layer = LAYERS[name]()
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(BATCH, D_MODEL))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(BATCH, 3, D_MODEL + 1))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(BATCH, 0, D_MODEL))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(BATCH, 3, D_MODEL, dtype=torch.int64))
    with pytest.raises(TypeError, match="cache"):
        layer(torch.randn(BATCH, 3, D_MODEL), cache=("not", "a cache"))
    with pytest.raises(ValueError, match="batch size 5"):
        layer(torch.randn(BATCH, 3, D_MODEL), cache=layer.new_cache(5, 10))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        LinearAttention(60, num_heads=8)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(D_MODEL, num_heads=HEADS, window=0)
    for base in (0.5, "10000", True):
        with pytest.raises(ValueError, match="rotary_base"):
            SlidingWindowAttention(D_MODEL, num_heads=HEADS, rotary_base=base)
    with pytest.raises(ValueError, match="even head dim"):
        apply_rotary(torch.randn(1, 2, 1, 5), torch.arange(2))
