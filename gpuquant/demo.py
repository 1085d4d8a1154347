"""``gpuquant demo``: float training, post-training int8, QAT int8 on scikit-learn's digits.

Stages (each timed, progress printed as it goes):

1. train the float :class:`gpuquant.models.DigitsNet` (8x8 grayscale, 10 classes);
2. PTQ: ``quantize_qat(calibration_qconfig)`` on a copy, calibration passes over training
   batches in eval mode, ``quantize`` -> int8;
3. QAT: ``quantize_qat(ema_fakequant_qconfig)`` on a copy, a short fine-tune (BatchNorm
   statistics frozen half way), ``quantize`` -> int8;
4. int8 inference on the best backend available (automatic selection), and a table:
   accuracies, QAT-vs-int8 top-1 agreement, the same int8 model with its epilogues fused
   (``fuse_epilogues``: logits byte-identical), model sizes, backend, times;
5. deployment: the QAT int8 model exported to ONNX (QDQ) and run by onnxruntime (if
   installed) and by :mod:`gpuquant.runtime` (NumPy only, checked byte-identical).

With ``out`` it writes ``out/demo.json`` (accuracies as fractions) and
``out/digits_int8.onnx``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Optional

import torch

from ._checks import check_bool, positive_int
from ._paths import out_problem

__all__ = ["run_demo", "load_digits_data"]

SEED = 0
TARGETS = {"ptq_points": 1.0, "qat_points": 0.5, "agreement": 0.99}


def load_digits_data(device="cpu"):
    """sklearn's digits (shipped with scikit-learn), 70/30 stratified split, standardized:
    ``(x_train, y_train, x_test, y_test)`` with x of shape (N, 1, 8, 8) float32."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise ImportError("gpuquant demo needs scikit-learn: pip install 'gpuquant[demo]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx = torch.arange(len(y))
    tr, te = train_test_split(idx.numpy(), test_size=0.3, random_state=SEED,
                              stratify=y.numpy())
    x_tr, x_te = x[tr], x[te]
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return x_tr.to(device), y[tr].to(device), x_te.to(device), y[te].to(device)


def _batches(x, y, bs, gen=None):
    order = torch.randperm(len(y), generator=gen, device="cpu").to(x.device) if gen is not None \
        else torch.arange(len(y), device=x.device)
    for i in range(0, len(y), bs):
        j = order[i:i + bs]
        yield x[j], y[j]


def _train(model, x, y, epochs, lr, log, label, freeze_bn_at=None, bs=64):
    from .quantization import freeze_bn_stats
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(y) + bs - 1) // bs))
    for ep in range(epochs):
        if freeze_bn_at is not None and ep == freeze_bn_at:
            freeze_bn_stats(model)
        model.train()
        total, n = 0.0, 0
        for xb, yb in _batches(x, y, bs, gen):
            if len(yb) < 2:
                continue
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(yb)
            n += len(yb)
        log(f"  {label} epoch {ep + 1}/{epochs}  loss {total / max(n, 1):.4f}")
    return model.eval()


@torch.no_grad()
def _predict(model, x, bs=256):
    return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])


@torch.no_grad()
def _same_logits(a, b, x, bs=256) -> bool:
    return all(torch.equal(a(x[i:i + bs]), b(x[i:i + bs])) for i in range(0, len(x), bs))


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()
               if isinstance(t, torch.Tensor))


def _int8_bytes(qmodel) -> int:
    # weights, biases and qparams of the quantized modules (what an int8 deployment stores)
    return sum(t.numel() * t.element_size() for k, t in qmodel.state_dict().items()
               if isinstance(t, torch.Tensor))


# what the demo writes in ``out``
OUT_FILES = ("demo.json", "digits_int8.onnx")


def run_demo(out: Optional[str] = None, float_epochs: int = 12, qat_epochs: int = 4,
             quiet: bool = False) -> int:
    """Run the demo; print the table; with ``out`` write ``out/demo.json``. Returns 0.

    Args:
        out: folder for ``demo.json`` (created if missing), or None.
        float_epochs, qat_epochs: training length (the defaults meet the README's targets).
        quiet: no progress lines (the table is still printed).

    Raises:
        TypeError / ValueError: an ``out`` that is not a usable folder path, epoch counts
            that are not ints >= 1, a ``quiet`` that is not a bool (checked before the run).
    """
    float_epochs = positive_int(float_epochs, "float_epochs", "run_demo")
    qat_epochs = positive_int(qat_epochs, "qat_epochs", "run_demo")
    check_bool(quiet, "run_demo", "quiet")
    if out is not None:
        why = out_problem(out, OUT_FILES)
        if why is not None:
            raise (TypeError if not isinstance(out, (str, os.PathLike)) else ValueError)(
                f"run_demo: out {why}")
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # one thread: this network is far too small to gain from more, and on a shared
        # machine two threads were 25x slower per step (245 vs 9 ms, 2 loaded cores)
        torch.set_num_threads(1)
    try:
        return _run(out, float_epochs, qat_epochs, quiet)
    finally:
        torch.set_num_threads(threads)


def _run(out, float_epochs, qat_epochs, quiet) -> int:
    from . import backends
    from .models import digits_net
    from .quantization import (calibration_qconfig, disable_observer, ema_fakequant_qconfig,
                               fuse_epilogues, quantize, quantize_qat)

    def log(msg):
        if not quiet:
            print(msg, flush=True)

    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = {}
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_data(device)
    log(f"gpuquant demo: scikit-learn digits, {len(y_tr)} train / {len(y_te)} test images "
        f"(8x8), device {device}")

    # 1. float
    log("[1/5] training the float model")
    t = time.perf_counter()
    float_model = _train(digits_net().to(device), x_tr, y_tr, float_epochs, 1e-2, log, "float")
    times["float train"] = time.perf_counter() - t
    float_pred = _predict(float_model, x_te)
    float_acc = float((float_pred == y_te).float().mean())
    log(f"  float accuracy {float_acc:.4f}")

    # 2. PTQ
    log("[2/5] post-training calibration (calibration_qconfig) and int8 conversion")
    t = time.perf_counter()
    ptq = quantize_qat(copy.deepcopy(float_model).eval(), calibration_qconfig)
    with torch.no_grad():
        for xb, _ in _batches(x_tr, y_tr, 256):
            ptq(xb)
    ptq_int8 = quantize(ptq)
    times["PTQ calibrate+convert"] = time.perf_counter() - t
    backend = backends.current() or backends.auto_backend(device)
    t = time.perf_counter()
    ptq_pred = _predict(ptq_int8, x_te)
    times["PTQ int8 eval"] = time.perf_counter() - t
    ptq_acc = float((ptq_pred == y_te).float().mean())
    log(f"  PTQ int8 accuracy {ptq_acc:.4f} (backend {backend})")

    # 3. QAT
    log("[3/5] quantization-aware fine-tuning (ema_fakequant_qconfig)")
    t = time.perf_counter()
    qat = quantize_qat(copy.deepcopy(float_model), ema_fakequant_qconfig)
    _train(qat, x_tr, y_tr, qat_epochs, 3e-4, log, "QAT", freeze_bn_at=qat_epochs // 2)
    times["QAT fine-tune"] = time.perf_counter() - t
    disable_observer(qat)  # observers record in eval mode too: the test set must not move
    qat_pred = _predict(qat, x_te)  # the ranges of the model that gets converted
    qat_acc = float((qat_pred == y_te).float().mean())
    log(f"  QAT (fake-quant) accuracy {qat_acc:.4f}")

    # 4. int8
    log("[4/5] converting the QAT model to int8 and running it")
    t = time.perf_counter()
    qat_int8 = quantize(copy.deepcopy(qat))
    times["QAT convert"] = time.perf_counter() - t
    t = time.perf_counter()
    int8_pred = _predict(qat_int8, x_te)
    times["QAT int8 eval"] = time.perf_counter() - t
    qat_int8_acc = float((int8_pred == y_te).float().mean())
    agreement = float((int8_pred == qat_pred).float().mean())
    t = time.perf_counter()
    fused = fuse_epilogues(copy.deepcopy(qat_int8))
    fused_same = _same_logits(qat_int8, fused, x_te)
    times["fused int8 eval"] = time.perf_counter() - t
    log(f"  epilogue fusion: {len(fused.fused)} conv/linear + add/dequant pairs, logits "
        f"{'identical' if fused_same else 'DIFFERENT'}")
    deploy = _deploy(qat_int8, x_te, y_te, int8_pred, out, times, log)
    times["total"] = time.perf_counter() - t0

    size_f, size_q = _nbytes(float_model), _int8_bytes(qat_int8)
    ok_ptq = (float_acc - ptq_acc) * 100 <= TARGETS["ptq_points"]
    ok_qat = (float_acc - qat_int8_acc) * 100 <= TARGETS["qat_points"]
    ok_agree = agreement >= TARGETS["agreement"]
    rows = [
        ("float accuracy", f"{float_acc:.4f}", ""),
        ("PTQ int8 accuracy", f"{ptq_acc:.4f}",
         f"{(ptq_acc - float_acc) * 100:+.2f} pt vs float (target >= -1)"),
        ("QAT (fake-quant) accuracy", f"{qat_acc:.4f}", ""),
        ("QAT int8 accuracy", f"{qat_int8_acc:.4f}",
         f"{(qat_int8_acc - float_acc) * 100:+.2f} pt vs float (target >= -0.5)"),
        ("QAT vs int8 top-1 agreement", f"{agreement:.4f}", "target >= 0.99"),
        ("int8, epilogues fused", f"{len(fused.fused)} pairs",
         "logits byte-identical to unfused" if fused_same else "LOGITS DIFFER from unfused"),
        ("model size float32", f"{size_f / 1024:.1f} KiB", ""),
        ("model size int8", f"{size_q / 1024:.1f} KiB", f"{size_f / max(size_q, 1):.2f}x smaller"),
        ("int8 backend", backend, str(device)),
    ] + deploy["rows"] + [(f"time: {k}", f"{v:.2f} s", "") for k, v in times.items()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print("\n" + "-" * (w0 + w1 + 40))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    print("-" * (w0 + w1 + 40))
    met = ok_ptq and ok_qat and ok_agree and fused_same
    print(f"targets met: {'yes' if met else 'NO'}", flush=True)

    if out is not None:
        os.makedirs(out, exist_ok=True)
        result = {"float_acc": float_acc, "ptq_int8_acc": ptq_acc, "qat_acc": qat_acc,
                  "qat_int8_acc": qat_int8_acc, "agreement": agreement, "backend": backend,
                  "device": str(device), "model_bytes_float": size_f, "model_bytes_int8": size_q,
                  "times_s": times, "targets_met": met, "n_test": int(len(y_te)),
                  "onnxruntime_acc": deploy["onnxruntime_acc"],
                  "runtime_acc": deploy["runtime_acc"], "runtime_exact": deploy["runtime_exact"],
                  "fused_pairs": len(fused.fused), "fused_identical": fused_same}
        with open(os.path.join(out, OUT_FILES[0]), "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.join(out, 'demo.json')}")
    return 0


def _deploy(qmodel, x_te, y_te, int8_pred, out, times, log) -> dict:
    """Export the int8 model to ONNX; accuracy of onnxruntime and of gpuquant.runtime on the
    test set, and whether the runtime's outputs equal gpuquant's byte for byte."""
    import tempfile

    res = {"rows": [], "onnxruntime_acc": None, "runtime_acc": None, "runtime_exact": None}
    try:
        import onnx  # noqa: F401
    except ImportError:
        res["rows"].append(("ONNX export", "skipped", "onnx not installed "
                                                      "(pip install 'gpuquant[deploy]')"))
        return res
    from . import runtime
    from .export import to_onnx
    log("[5/5] exporting the int8 model to ONNX (QDQ) and running it outside torch")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(out if out is not None else tmp, OUT_FILES[1])
        if out is not None:
            os.makedirs(out, exist_ok=True)
        to_onnx(qmodel, x_te[:8], path)
        x = x_te.detach().cpu().numpy()
        y = y_te.detach().cpu().numpy()
        with torch.no_grad():
            ref = torch.cat([qmodel(x_te[i:i + 256]) for i in range(0, len(x_te), 256)])
        ref = ref.cpu().numpy()
        got = runtime.load(path).run(x)
        res["runtime_exact"] = bool(got.tobytes() == ref.tobytes())
        res["runtime_acc"] = float((got.argmax(1) == y).mean())
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            from .export.ort import session
            sess = session(path)  # its fused int8 kernels saturate on x86 without VNNI
            got_ort = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            res["onnxruntime_acc"] = float((got_ort.argmax(1) == y).mean())
            agree = float((got_ort.argmax(1) == int8_pred.cpu().numpy()).mean())
            res["rows"].append(("onnxruntime int8 accuracy", f"{res['onnxruntime_acc']:.4f}",
                                f"top-1 agreement with gpuquant int8 {agree:.4f}"))
        else:
            res["rows"].append(("onnxruntime int8 accuracy", "n/a",
                                "onnxruntime not installed"))
        res["rows"].append(("gpuquant.runtime accuracy", f"{res['runtime_acc']:.4f}",
                            "NumPy only; bytes equal gpuquant int8: "
                            + ("yes" if res["runtime_exact"] else "NO")))
    times["ONNX export + runs"] = time.perf_counter() - t
    return res


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else None))
