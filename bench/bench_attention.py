"""attention: our fused FlashAttention-2 kernels against torch SDPA and the plain torch math
reference, forward and forward+backward, BERT-like shapes (D=64, H=12), with and without padding.

TFLOP/s counts 4*B*H*S_q*S_k*D for the forward (two matmuls), x2.5 more for the backward (five),
so 3.5x for fwd+bwd; halved when causal. Padding does not change the count (the kernels still
walk the padded keys), so padded rows show the cost of the masking. On CPU our kernels run in
Triton's interpreter: checked for correctness, not timed; SDPA and the math reference are timed.
"""
import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, run_cases
from tkd_core.kernels.attention import attention_ref
from tkd_core.ops import attention


def sdpa(q, k, v, mask):
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S_k) True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def ours(q, k, v, mask):
    return attention(q, k, v, key_padding_mask=mask)


def math_ref(q, k, v, mask):
    return attention_ref(q, k, v, key_padding_mask=mask)


def with_backward(fn):
    def run(q, k, v, mask, do):
        out = fn(q, k, v, mask)
        return (out, *torch.autograd.grad(out, (q, k, v), do))
    return run


def forward_only(fn):
    return lambda q, k, v, mask, do: fn(q, k, v, mask)


def reference64(backward):
    def ref(q, k, v, mask, do):
        q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
        out = attention_ref(q64, k64, v64, key_padding_mask=mask)
        if not backward:
            return out
        return (out, *torch.autograd.grad(out, (q64, k64, v64), do.double()))
    return ref


def make_case(B, H, S, D, dtype, device, padded, mode):
    backward = mode == "fwd+bwd"

    def make_inputs():
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype).requires_grad_(backward)
                   for _ in range(3))
        mask = None
        if padded:  # BERT batches: every sequence non-empty, lengths in [S/2, S]
            lengths = torch.randint(S // 2, S + 1, (B,), device=device)
            mask = torch.arange(S, device=device)[None, :] < lengths[:, None]
        do = torch.randn(B, H, S, D, device=device, dtype=dtype)
        return q, k, v, mask, do

    wrap = with_backward if backward else forward_only
    flops = 4 * B * H * S * S * D * (3.5 if backward else 1.0)
    return Case(op="attention", shape=f"B={B} H={H} S={S} D={D}" + (" padded" if padded else ""),
                dtype=dtype, make_inputs=make_inputs,
                providers={"ours": Provider(wrap(ours), time_on_cpu=False),
                           "torch_sdpa": Provider(wrap(sdpa)),
                           "math_ref": Provider(wrap(math_ref))},
                reference64=reference64(backward), flops=int(flops), mode=mode)


def main(device, quick=False):
    H, D = 12, 64
    if device.type == "cuda":
        seqs = (512, 2048) if quick else (128, 512, 2048)
        shapes = [(16384 // S, S) for S in seqs]  # 16k tokens per batch
        dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16)
    else:  # interpreter: a correctness check of the kernels at BERT head shapes, one sequence
        shapes = [(1, 128)] if quick else [(1, 128), (1, 512)]
        dtypes = (torch.float16,)
    cases = [make_case(B, H, S, D, dt, device, padded, mode)
             for mode in ("fwd", "fwd+bwd") for dt in dtypes for B, S in shapes
             for padded in (False, True)]
    return run_cases("attention", cases, device, targets=[
        "fwd and fwd+bwd TFLOP/s >= FlashAttention-2 at D=64 (same GPU, same shapes)",
        "H100 fp16 D=64 forward: about 280-320 TFLOP/s (FlashAttention-2's published range)",
    ])
