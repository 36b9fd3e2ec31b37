"""Accuracy and time of float32 Gram products summed in float64 (issue 16, calibrate).

``calibrate(..., products="compute")`` (the default) forms each batch's
:math:`X^\\top X` and :math:`G^\\top G` in the model's compute dtype (float32
for a float32 model) and sums the products in float64;
``products="accumulation"`` forms them in float64. Sections:

``synthetic``
    ``MomentAccumulator`` on float32 tokens with a covariance spectrum
    decaying over four decades and a few outlier channels: relative error of
    the top eigenvalues of :math:`C_x`, and the relative change of the
    curvature-norm error of a compressed layer (both errors measured with
    the all-float64 covariance); the time of one batch's product each way.
``margin``
    Rank-deficient float32-formed Grams (fewer rows than features): the most
    negative eigenvalue against the recorded tolerance
    :math:`\\sqrt{k}\\, u_{32} \\operatorname{tr} C`
    (:meth:`~jactus_linalg.covariance.GramProducts.tolerance`).
``model``
    A float32 model calibrated both ways on the same batches (``--model``:
    ``vit-tiny``, ``vit`` = the ViT of ``validation/bench.py`` (ViT-Base
    widths, 2 layers), ``smollm2``): per target layer, the relative error of
    the top-10 eigenvalues of :math:`C_x` and :math:`C_g`, and of the
    curvature-norm error of the layer compressed at a quarter of its rank
    (JACTUS whitening on both sides; both errors measured with the float64
    statistics); worst and median over layers.
``time``
    ``calibrate`` each way against a plain forward+backward over the same
    batches, on the ViT of ``validation/bench.py`` (medians of ratios
    measured side by side, rotating order; the calibration row of
    ``validation/bench.py`` measures the default alone).

Run: ``python validation/bench_products.py`` (all sections, ``--model vit``),
``--only model --model smollm2``, ``--repeat 3``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from jactus_linalg import projected_lowrank
from jactus_linalg.covariance import MomentAccumulator
from jactus_linalg.lowrank import curvature_error

SECTIONS = ("synthetic", "margin", "model", "time")


def float32_tokens(
    rng: np.random.Generator, count: int, dim: int, rank: int | None = None,
    basis: np.ndarray | None = None,
) -> np.ndarray:
    """Float32 tokens: geometric spectrum 1 to 1e-2 (variance 1 to 1e-4), 4 outlier channels x30.

    With ``rank < dim`` and one ``basis`` (orthonormal, ``dim x dim``) for every
    batch, the tokens span ``rank`` dimensions: the moment is rank-deficient.
    """
    rank = dim if rank is None else rank
    scales = np.geomspace(1.0, 1e-2, rank)
    if basis is None:
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    x = (rng.standard_normal((count, rank)) * scales) @ basis[:, :rank].T
    x[:, :4] *= 30.0
    return x.astype(np.float32)


def accumulate(batches: list, products: str) -> MomentAccumulator:
    acc = MomentAccumulator(batches[0].shape[-1], dtype="float64", products=products)
    for b in batches:
        acc.update(b)
    return acc


def best_time(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def top_eig_rel(c32, c64, top: int = 10) -> float:
    """Largest relative error of the ``top`` eigenvalues of ``c32`` against ``c64``."""
    lam32 = np.linalg.eigvalsh(np.asarray(c32, dtype=np.float64))[::-1][:top]
    lam64 = np.linalg.eigvalsh(np.asarray(c64, dtype=np.float64))[::-1][:top]
    return float(np.max(np.abs(lam32 - lam64) / np.abs(lam64)))


def synthetic(dim: int, batches: int, rows: int, rank: int, seed: int = 0) -> dict[str, float]:
    from jactus_linalg.whitening import whitening_operator

    rng = np.random.default_rng(seed)
    data = [float32_tokens(rng, rows, dim) for _ in range(batches)]
    a64, a32 = accumulate(data, "accumulation"), accumulate(data, "compute")
    c64, c32 = a64.result(), a32.result()
    weight = rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
    errors = {}
    for label, acc in (("float64", a64), ("float32", a32)):
        op = whitening_operator(acc.result(), method="cholesky", products=acc.gram_products)
        res = projected_lowrank(weight, rank, input_cov=op)
        errors[label] = curvature_error(weight, res.left, res.core, res.right, input_cov=c64)
    b = data[0]
    b64 = b.astype(np.float64)
    lam32, lam64 = np.linalg.eigvalsh(c32), np.linalg.eigvalsh(c64)
    return {
        "top_eig_rel": top_eig_rel(c32, c64),
        "all_eig_rel_to_max": float(np.max(np.abs(lam32 - lam64)) / lam64[-1]),
        "cov_rel": float(np.linalg.norm(c32 - c64) / np.linalg.norm(c64)),
        "err_float64": errors["float64"],
        "err_cost": abs(errors["float32"] / errors["float64"] - 1.0),
        "t_f64": best_time(lambda: b64.T @ b64),
        "t_f32": best_time(lambda: b.T @ b),
    }


def run_synthetic(args: argparse.Namespace) -> None:
    print(f"\n[synthetic] {args.batches} batches of {args.rows} float32 tokens; float32 eps = "
          f"{np.finfo(np.float32).eps:.3g}")
    print(f"{'dim':>5} {'rank':>5} {'top-10 eig':>11} {'eig/max':>9} {'||dC||/||C||':>13} "
          f"{'err f64':>10} {'err cost':>9} {'t f64 s':>8} {'t f32 s':>8}")
    for dim, rank in ((768, 192), (3072, 384)):
        r = synthetic(dim, args.batches, args.rows, rank)
        print(f"{dim:>5} {rank:>5} {r['top_eig_rel']:>11.2e} {r['all_eig_rel_to_max']:>9.2e} "
              f"{r['cov_rel']:>13.2e} {r['err_float64']:>10.4g} {r['err_cost']:>9.2e} "
              f"{r['t_f64']:>8.3f} {r['t_f32']:>8.3f}", flush=True)


def run_margin(args: argparse.Namespace) -> None:
    """-lambda_min of rank-deficient float32-formed Grams against sqrt(k) u tr C."""
    import torch

    print("\n[margin] rank-deficient float32 Grams (3 batches): -lambda_min / (sqrt(k) u32 tr C)")
    print(f"{'lib':>6} {'rows k':>7} {'n':>5} {'rank':>5} {'-lmin/lmax':>11} {'-lmin/tol':>10} "
          f"{'tol/lmax':>9}")
    rng = np.random.default_rng(1)
    for rows, n, rank in ((32, 64, 32), (256, 64, 40), (1576, 768, 700), (4096, 1536, 1200)):
        basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
        for lib in ("numpy", "torch"):
            data = [float32_tokens(rng, rows, n, rank, basis) for _ in range(3)]
            if lib == "torch":
                data = [torch.from_numpy(b) for b in data]
            acc = accumulate(data, "compute")
            cov = np.asarray(acc.result())
            lam = np.linalg.eigvalsh(cov)
            tol = acc.gram_products.tolerance(float(np.trace(cov)))
            exact = np.linalg.eigvalsh(np.asarray(accumulate(data, "accumulation").result()))
            assert exact[0] < 1e-12 * exact[-1], "the tokens must span fewer than n dimensions"
            print(f"{lib:>6} {rows:>7} {n:>5} {rank:>5} {-lam[0] / lam[-1]:>11.2e} "
                  f"{-lam[0] / tol:>10.2e} {tol / lam[-1]:>9.2e}", flush=True)


def model_setup(name: str, batch_count: int):
    """``(model, batches, loss_fn, label)`` for a float32 model."""
    import torch

    if name in ("vit", "vit-tiny"):
        from validation.bench import build_vit, vit_config

        config = vit_config(quick=name == "vit-tiny", layers=None if name == "vit-tiny" else 2)
        model = build_vit(config)
        gen = torch.Generator().manual_seed(1)
        size = (8, config.num_channels, config.image_size, config.image_size)
        batches = [{"pixel_values": torch.randn(size, generator=gen),
                    "labels": torch.randint(0, config.num_labels, (8,), generator=gen)}
                   for _ in range(batch_count)]
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        label = (f"ViT {config.hidden_size}/{config.intermediate_size}, "
                 f"{config.num_hidden_layers} layers, random init, 8x{tokens} tokens per batch")
        return model, batches, lambda m, b: m(**b).loss, label
    if name == "smollm2":
        from validation.assets import load_smollm2

        loaded = load_smollm2(torch.float32)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.eval()
        gen = torch.Generator().manual_seed(1)
        vocab = int(model.config.vocab_size)
        batches = []
        for _ in range(batch_count):
            ids = torch.randint(0, vocab, (4, 128), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        return model, batches, lambda m, b: m(**b).loss, "SmolLM2-135M, 4x128 random tokens per batch"
    msg = f"`--model` must be vit-tiny, vit or smollm2; got {name!r}"
    raise ValueError(msg)


def run_model(args: argparse.Namespace) -> None:
    from jactus_linalg.torch import calibrate
    from jactus_linalg.whitening import whitening_operator

    model, batches, loss_fn, label = model_setup(args.model, args.model_batches)
    print(f"\n[model] {label}, {len(batches)} batches, calibrate both ways", flush=True)
    stats = {p: calibrate(model, batches, loss_fn, progress=False, products=p)
             for p in ("accumulation", "compute")}
    modules = dict(model.named_modules())
    rows = []
    for name in stats["compute"]:
        a, b = stats["compute"].layer(name), stats["accumulation"].layer(name)
        weight = modules[name].weight.detach().double()
        m, n = weight.shape
        rank = max(1, min(m, n) // 4)
        ops = {}
        for key, s in (("f32", a), ("f64", b)):
            ops[key] = (whitening_operator(s.input_cov, method="cholesky", name="input_cov",
                                           products=s.input_products),
                        whitening_operator(s.grad_cov, method="cholesky", name="grad_cov",
                                           products=s.grad_products))
        errs = {}
        for key in ("f32", "f64"):
            res = projected_lowrank(weight, rank, input_cov=ops[key][0], grad_cov=ops[key][1])
            errs[key] = curvature_error(weight, res.left, res.core, res.right,
                                        input_cov=ops["f64"][0], grad_cov=ops["f64"][1])
        rows.append((name, top_eig_rel(a.input_cov, b.input_cov),
                     top_eig_rel(a.grad_cov, b.grad_cov), abs(errs["f32"] / errs["f64"] - 1.0),
                     a.input_products, a.grad_products))
    print(f"{'layer':<44} {'Cx top-10':>10} {'Cg top-10':>10} {'err cost':>9}  products (x; g)")
    for name, ex, eg, ec, px, pg in rows:
        print(f"{name[-44:]:<44} {ex:>10.2e} {eg:>10.2e} {ec:>9.2e}  {px.dtype}/{px.rows}; "
              f"{pg.dtype}/{pg.rows}")
    for label_, col in (("worst", max), ("median", statistics.median)):
        print(f"{label_:<44} {col(r[1] for r in rows):>10.2e} {col(r[2] for r in rows):>10.2e} "
              f"{col(r[3] for r in rows):>9.2e}")


def run_time(args: argparse.Namespace) -> None:
    from jactus_linalg.torch import calibrate
    from validation.bench import paired_ratio, plain_pass, rounds, vit_setup

    ns = argparse.Namespace(quick=False, vit_layers=2, batch=8, batches=args.time_batches)
    setup = vit_setup(ns)
    print(f"\n[time] {setup.label}, {len(setup.batches)} batches, {args.repeat} rounds", flush=True)
    plain_pass(setup)  # warm-up

    def cal(products: str):
        return lambda: calibrate(setup.model, setup.batches, setup.loss_fn, progress=False,
                                 products=products)

    times = rounds({"plain": lambda: plain_pass(setup), "compute": cal("compute"),
                    "accumulation": cal("accumulation")}, args.repeat)
    for key in ("compute", "accumulation"):
        print(f"calibrate products={key!r:<15} / plain fwd+bwd: wall "
              f"{paired_ratio(times, key, 'plain'):.2f}x, process CPU "
              f"{paired_ratio(times, key, 'plain', 'cpu'):.2f}x (median of {args.repeat} paired "
              f"rounds; plain median {statistics.median(times['plain']['wall']):.2f} s wall)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SECTIONS, nargs="*", default=None)
    p.add_argument("--batches", type=int, default=16, help="synthetic: batches")
    p.add_argument("--rows", type=int, default=1576, help="synthetic: tokens per batch (8 ViT images)")
    p.add_argument("--model", default="vit", choices=("vit-tiny", "vit", "smollm2"))
    p.add_argument("--model-batches", type=int, default=4)
    p.add_argument("--time-batches", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="time: rounds")
    args = p.parse_args(argv)
    import torch

    print(f"torch threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    runners = {"synthetic": run_synthetic, "margin": run_margin, "model": run_model, "time": run_time}
    for section in args.only or SECTIONS:
        runners[section](args)


if __name__ == "__main__":
    main()
