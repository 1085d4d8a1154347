"""On a CUDA GPU: the Triton dynamic kernels against the NumPy oracle (the same checks run
on the CPU through the Triton interpreter in test_dynamic_ops.py)."""
import pytest
import torch

from gpuquant import backends
from gpuquant.backends.triton.dynamic import weight_only_forms
from gpuquant.bench.warm import WO_TEST_N, weight_only_test_shapes
from gpuquant.functional.dynamic import linear_dynamic, linear_weight_only, quantize_per_token
from gpuquant.nn.quantized.linear_dynamic import DynamicLinear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (7, 33, 123), (300, 1000, 2050),
                                   (129, 256, 16411)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_gpu_matches_numpy_oracle(m, n, k, dtype):
    lin = torch.nn.Linear(k, n)
    x = (torch.randn(m, k) * torch.exp(torch.randn(m, 1))).to(dtype)
    q_cpu = DynamicLinear.from_float_module(lin).eval()
    q_gpu = DynamicLinear.from_float_module(lin.cuda()).eval()
    with torch.no_grad():
        with backends.use("numpy"):
            xq_ref, xs_ref = quantize_per_token(x)
            y_ref = q_cpu(x)
        with backends.use("triton"):
            xq, xs = quantize_per_token(x.cuda())
            y = q_gpu(x.cuda())
            yw = linear_weight_only(x.cuda(), q_gpu.weight, q_gpu.weight_scale, q_gpu.bias)
    assert torch.equal(xq.cpu(), xq_ref) and torch.equal(xs.cpu(), xs_ref)
    # the weights quantized on the GPU equal those quantized on the CPU
    assert torch.equal(q_gpu.weight.cpu(), q_cpu.weight)
    assert torch.equal(q_gpu.weight_scale.cpu(), q_cpu.weight_scale)
    yc = y.cpu()
    if not torch.equal(yc, y_ref):
        bad = (yc != y_ref).nonzero()
        i, j = bad[0].tolist()
        bits = lambda t: t.float().view(torch.int32)  # noqa: E731
        ulps = (bits(yc) - bits(y_ref)).abs().max().item()
        pytest.fail(f"{len(bad)} of {y_ref.numel()} outputs differ (at most {ulps} float32 "
                    f"ulps of the {dtype} values); first at {i, j}: gpu {yc[i, j].item()!r} "
                    f"numpy {y_ref[i, j].item()!r}, x_scale {xs_ref[i].item()!r}, w_scale "
                    f"{q_cpu.weight_scale[j].item()!r}, bias {q_cpu.bias[j].item()!r}")
    with backends.use("numpy"):
        yw_ref = linear_weight_only(x, q_cpu.weight, q_cpu.weight_scale, q_cpu.bias)
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert torch.allclose(yw.cpu().float(), yw_ref.float(), rtol=tol,
                          atol=tol * yw_ref.float().abs().max().item())


def test_triton_gpu_integer_products_exact():
    k = 8192
    xq = torch.randint(-128, 128, (64, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (96, k), dtype=torch.int8)
    with backends.use("triton"):
        y = linear_dynamic(xq.cuda(), torch.ones(64, device="cuda"), wq.cuda(),
                           torch.ones(96, device="cuda"), None, torch.float32)
    exact = (xq.to(torch.int64) @ wq.to(torch.int64).t()).to(torch.int32).to(torch.float32)
    assert torch.equal(y.cpu(), exact)


@pytest.mark.parametrize("cls", ["DynamicLinear", "WeightOnlyLinear"])
def test_decode_replays_from_cuda_graph(cls):
    """The bench's decode ``-graph`` rows: a module captured in a CUDA graph (split-K
    weight-only included: its workspace comes from the graph's pool, its tickets are
    allocated by the warm-up) replays to the eager call's bytes, with new input data."""
    from gpuquant.bench.harness import cuda_graph_of
    from gpuquant.nn.quantized import linear_dynamic as LD
    lin = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    mod = getattr(LD, cls).from_float_module(lin).eval()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def call():
        with backends.use("triton"), torch.no_grad():
            return mod(x)
    graph, out = cuda_graph_of(call, warmup=3)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, call())


@pytest.mark.parametrize("weight_only", [False, True])
def test_qat_under_autocast_on_the_gpu(weight_only):
    """The QAT Linear under CUDA autocast: its forward is the served int8 computation (equal
    to the converted module's output and to the NumPy oracle's), its gradients the float32
    composition's to bf16 rounding (test_dynamic_models' CPU test, compiled kernels)."""
    import copy

    from gpuquant.quantization.dynamic import prepare_dynamic_qat, quantize_dynamic
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 1000)
    x = (torch.randn(300, 4096) * torch.exp(torch.randn(300, 1))).to(torch.bfloat16)
    qat = prepare_dynamic_qat(torch.nn.Sequential(copy.deepcopy(lin).cuda()),
                              weight_only=weight_only)[0]
    xg = x.cuda().requires_grad_()
    g = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    with backends.use("triton"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = qat(xg)
        y.backward(g)
        grads = (xg.grad, qat.weight.grad, qat.bias.grad)
        with torch.no_grad():
            served = quantize_dynamic(copy.deepcopy(torch.nn.Sequential(qat)),
                                      weight_only=weight_only)[0]
            assert torch.equal(y, served(x.cuda()))
        xg.grad = qat.weight.grad = qat.bias.grad = None
        qat(xg).backward(g)  # autocast off: the float32 composition
    want = (xg.grad, qat.weight.grad, qat.bias.grad)
    if not weight_only:  # the NumPy oracle of the W8A8 output (weight-only: float32 sums)
        with backends.use("numpy"), torch.no_grad():
            ref = quantize_dynamic(torch.nn.Sequential(copy.deepcopy(qat).cpu()))[0](x)
        assert torch.equal(y.cpu(), ref)
    for a, b in zip(grads, want):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < 2e-2, err


def test_qat_encoder_layer_under_autocast_on_the_gpu():
    """A QAT TransformerEncoderLayer (its MHA and Linears) under CUDA autocast equals its
    converted layer bit for bit, and a training step reaches the MHA's parameters."""
    import copy

    from gpuquant.quantization.dynamic import prepare_dynamic_qat, quantize_dynamic
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    layer = layer.cuda()
    mha = layer.self_attn
    qat = prepare_dynamic_qat(layer)
    x = torch.randn(4, 33, 256, device="cuda")
    with backends.use("triton"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            qat(x).float().square().mean().backward()
        assert mha.in_proj_weight.grad.abs().sum() > 0
        qat.eval()
        served = quantize_dynamic(copy.deepcopy(qat))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(qat(x), served(x))


@pytest.mark.parametrize("tile,w_a", weight_only_forms(),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("W_A" if v else "plain"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_weight_only_tile_on_the_gpu(tile, w_a, dtype):
    """Each weight-only config forced (compiled for this GPU: the transposed form's register
    operand, the GEMV's exact int8 -> float conversion and register prefetch, the deep
    pipelines), whole and ragged K, split and not: within float32 summation rounding of the
    float64 product (test_dynamic_ops' CPU checks run one small tile through the
    interpreter). Its kernels are in `make tcache`'s prebuilt cache (gpuquant.bench.warm)."""
    from gpuquant.backends.triton import dynamic as D
    g = torch.Generator().manual_seed(sum(tile) + 7 * w_a)
    n = WO_TEST_N
    for m, k, split in weight_only_test_shapes(tile):
        x = (torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g)))
        x = x.to(dtype).cuda()
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).cuda()
        ws = (torch.rand(n, generator=g) * 0.01 + 1e-3).cuda()
        b = torch.randn(n, generator=g).cuda()
        y = D.linear_weight_only(x, wq, ws, b, split_k=split, tile=tile, w_a=w_a)
        exact = (x.double() @ wq.double().t()) * ws.double() + b.double()
        scale = (x.double().abs() @ wq.double().abs().t()) * ws.double()
        out_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23
        tol = scale * k * 2.0 ** -24 + exact.abs() * out_ulp + 1e-6
        err = (y.double() - exact).abs()
        assert y.dtype == dtype and y.shape == (m, n)
        assert bool((err <= tol).all()), (m, k, split, (err / tol).max().item())
        assert torch.equal(y, D.linear_weight_only(x, wq, ws, b, split_k=split, tile=tile,
                                                   w_a=w_a)), "not deterministic"
    assert not bool(D.launch_tickets(1, x.device).any())
