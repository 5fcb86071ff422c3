"""Evaluation cost against its floor: the six attacks (Table 1's cost) and certification.

An attack's floor is the model passes it makes, priced at the batched rate: every forward through
the model is counted (rows, and whether it builds a graph for an input gradient), and the floor is
rows x (seconds per row of one batched forward+backward, or forward, at the attack batch size).
For an epsilon search of K runs of S steps that is the issue's K x S batched passes per image; the
ratio to the floor is what the implementation adds (Python, small late batches), and K itself is
reported as runs per image. Certification's floor is plain forward passes of noisy batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.timing import median_times, timed
from momentreg.models.zoo import build_model
from momentreg.tables import markdown_table

ATTACK_BATCH = 100  # minimal_perturbations' default


def _trained_lenet(device, train_images: int):
    from momentreg.data.datasets import load_dataset, train_val_split
    from momentreg.training.loop import train

    torch.manual_seed(0)
    tr_x, tr_y = load_dataset("mnist-sample", split="train")
    train_set, val_set = train_val_split(tr_x[:train_images], tr_y[:train_images], 0.1)
    model = build_model("lenet", "mnist")
    train(
        model, train_set, val_set, epochs=1, lr=1e-3, batch_size=128, progress=False, device=device
    )
    return model.eval()


def _row_seconds(model, device, repeats: int = 5) -> dict[str, float]:
    """Seconds per image row of a batched forward+backward (to the input) and of a forward."""
    x = torch.rand(ATTACK_BATCH, 1, 28, 28, device=device)
    y = torch.zeros(ATTACK_BATCH, dtype=torch.long, device=device)

    def fb():
        z = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)

    def fwd():
        with torch.no_grad():
            model(x)

    ten = median_times(
        {
            "forward_backward": lambda: [fb() for _ in range(10)],
            "forward": lambda: [fwd() for _ in range(10)],
        },
        repeats,
        device,
    )
    return {name: seconds / 10 / ATTACK_BATCH for name, seconds in ten.items()}


class _RowCounter:
    """Counts the image rows the model sees, split by whether an input gradient is being built."""

    def __init__(self, model):
        self.grad = self.forward = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        x = inputs[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad += len(x)
        else:
            self.forward += len(x)


def bench_attacks(device, images: int, reference_images: int, train_images: int) -> dict:
    """Every attack on the same ``images`` sample test images (Table 1's work for one model),
    then the scipy L-BFGS reference against the batched L-BFGS on ``reference_images``."""
    from momentreg.data.datasets import load_dataset, to_float
    from momentreg.evaluation.attacks import ATTACKS, minimal_perturbations, summarize

    model = _trained_lenet(device, train_images)
    for p in model.parameters():
        p.requires_grad_(False)
    test_x, test_y = load_dataset("mnist-sample", split="test")
    x, y = to_float(test_x[:images]), test_y[:images]
    rate = _row_seconds(model, device)
    out = {"images": images, "batch": ATTACK_BATCH, "row_seconds": rate, "attacks": {}}
    for name in ATTACKS:
        counter = _RowCounter(model)
        result, seconds = timed(lambda: minimal_perturbations(model, x, y, name), device)  # noqa: B023
        counter.handle.remove()
        n = max(1, len(result.success))
        floor = counter.grad * rate["forward_backward"] + counter.forward * rate["forward"]
        s = summarize(result)
        out["attacks"][name] = {
            "seconds": seconds,
            "seconds_per_image": seconds / n,
            "floor_seconds_per_image": floor / n,
            "ratio_to_floor": seconds / floor,
            "runs_per_image": s["runs_per_image"],
            "passes_per_image": (counter.grad + counter.forward) / n,
            "success_rate": s["success_rate"],
            "energy_median": s["energy_median"],
        }
    out["table1_seconds"] = sum(a["seconds"] for a in out["attacks"].values())
    out["lbfgs_reference"] = _lbfgs_against_scipy(model, x, y, reference_images)
    return out


def _lbfgs_against_scipy(model, x, y, images: int) -> dict:
    """Both L-BFGS versions on the first ``images`` correctly classified test images."""
    from momentreg.evaluation.fixed_eps import misclassified
    from momentreg.evaluation.lbfgs import lbfgs_attack
    from tests.lbfgs_scipy import lbfgs_scipy

    keep = ~misclassified(model, x, y)
    x, y = x[keep][:images], y[keep][:images]
    out = {"images": len(x)}
    for name, attack in (("batched", lbfgs_attack), ("scipy", lbfgs_scipy)):
        (d, ok), seconds = timed(lambda: attack(model, x, y), x.device)  # noqa: B023
        energy = (d[ok].flatten(1).double() ** 2).mean(1)
        out[name] = {
            "seconds_per_image": seconds / max(1, len(x)),
            "success_rate": float(ok.float().mean()),
            "energy_median": float(energy.median()) if len(energy) else float("nan"),
        }
    out["speedup"] = out["scipy"]["seconds_per_image"] / out["batched"]["seconds_per_image"]
    out["energy_ratio"] = out["batched"]["energy_median"] / out["scipy"]["energy_median"]
    return out


def bench_certify(device, images: int, n: int, batch: int = 1000) -> dict:
    """CERTIFY's noisy samples per second on LeNet against plain forward passes of noisy batches
    of the same size (the floor: sampling, counting and the bound are the overhead)."""
    from momentreg.evaluation.certify import certify_images

    torch.manual_seed(0)
    model = build_model("lenet", "mnist").to(device).eval()
    x = torch.rand(images, 1, 28, 28)
    n0 = 100
    labels = torch.zeros(images, dtype=torch.long)
    _, seconds = timed(
        lambda: certify_images(model, x, labels, 0.25, n0=n0, n=n, alpha=0.001, batch=batch),
        device,
    )
    samples = images * (n0 + n)
    certify_rate = samples / seconds
    noisy = torch.rand(batch, 1, 28, 28, device=device)
    passes = max(1, samples // batch)

    def floor():
        for _ in range(passes):
            model(noisy)

    with torch.inference_mode():
        model(noisy)
        _, seconds = timed(floor, device)
    floor_rate = passes * batch / seconds
    return {
        "images": images,
        "n": n,
        "batch": batch,
        "samples_per_second": certify_rate,
        "floor_samples_per_second": floor_rate,
        "ratio_to_floor": certify_rate / floor_rate,
    }


def attacks_markdown(a: dict) -> list[str]:
    rows = [
        [
            name,
            f"{r['seconds_per_image']:.3f}",
            f"{r['floor_seconds_per_image']:.3f}",
            f"**{r['ratio_to_floor']:.2f}**",
            f"{r['runs_per_image']:.1f}",
            f"{r['passes_per_image']:.0f}",
            f"{r['success_rate']:.2f}",
        ]
        for name, r in a["attacks"].items()
    ]
    header = [
        "attack",
        "s / image",
        "floor s / image",
        "ratio",
        "runs / image",
        "passes / image",
        "success",
    ]
    ref = a["lbfgs_reference"]
    return [
        f"### Attacks on {a['images']} test images (LeNet, one epoch on the MNIST sample), "
        f"batch {a['batch']}",
        "",
        markdown_table(header, rows, align="lrrrrrr"),
        "",
        f"All six attacks on the {a['images']} images (Table 1's work for one model): "
        f"**{a['table1_seconds']:.0f} s**.",
        "",
        f"L-BFGS on {ref['images']} images, batched against the scipy reference: "
        f"{ref['batched']['seconds_per_image']:.3f} s against "
        f"{ref['scipy']['seconds_per_image']:.3f} s per image (**{ref['speedup']:.1f}x**); median "
        f"energy {ref['batched']['energy_median']:.2e} against {ref['scipy']['energy_median']:.2e} "
        f"(ratio **{ref['energy_ratio']:.3f}**).",
    ]


def certify_markdown(c: dict) -> list[str]:
    row = [
        f"{c['images']} images x {c['n']} samples, batch {c['batch']}",
        f"{c['samples_per_second']:.0f}",
        f"{c['floor_samples_per_second']:.0f}",
        f"**{c['ratio_to_floor']:.2f}**",
    ]
    header = ["CERTIFY, LeNet", "noisy samples / s", "forward-pass floor / s", "ratio"]
    return ["### Certification throughput", "", markdown_table(header, [row], align="lrrr")]


def bench_corruptions(device, images: int, repeats: int) -> dict:
    """The four CIFAR-10-C noise corruptions at five severities on uint8 CIFAR-sized images
    (LeNet), against their floor: 20 plain forward passes of the same images, batch by batch."""
    from momentreg.data.datasets import to_float
    from momentreg.evaluation.corruptions import CORRUPTIONS, corruption_accuracy

    torch.manual_seed(0)
    model = build_model("lenet", "cifar10").to(device).eval()
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (images,))
    batch = 256

    def floor():
        with torch.inference_mode():
            for _ in range(len(CORRUPTIONS) * 5):
                for i in range(0, images, batch):
                    model(to_float(x[i : i + batch].to(device))).argmax(1)

    def corruptions():
        corruption_accuracy(model, x, y, batch_size=batch, device=device)

    t = median_times({"floor": floor, "corruptions": corruptions}, repeats, device, warmup=0)
    return {
        "images": images,
        "corruption_seconds": t["corruptions"],
        "floor_seconds": t["floor"],
        "ratio": t["corruptions"] / t["floor"],
    }


def targets_markdown(a: dict, c: dict, corruptions: dict | None = None) -> list[str]:
    """The evaluation targets, each checked against this run's numbers."""
    worst = max(a["attacks"], key=lambda k: a["attacks"][k]["ratio_to_floor"])
    worst_ratio = a["attacks"][worst]["ratio_to_floor"]
    ref = a["lbfgs_reference"]
    lbfgs = a["attacks"]["lbfgs"]["seconds_per_image"]
    table1 = a["table1_seconds"] * 400 / a["images"]
    checks = [
        ("every attack <= 2x its floor", f"worst: {worst}, {worst_ratio:.2f}", worst_ratio <= 2),
        ("L-BFGS <= 0.5 s per image", f"{lbfgs:.3f} s", lbfgs <= 0.5),
        ("batched L-BFGS >= 10x the scipy version", f"{ref['speedup']:.1f}x", ref["speedup"] >= 10),
        ("... with median energy within 5% of it", f"ratio {ref['energy_ratio']:.3f}",
         abs(ref["energy_ratio"] - 1) <= 0.05),
        ("Table 1 for one LeNet (6 attacks x 400 images) <= 600 s", f"{table1:.0f} s",
         table1 <= 600),
        ("certification >= 0.8x the forward-pass floor", f"{c['ratio_to_floor']:.2f}",
         c["ratio_to_floor"] >= 0.8),
    ]  # fmt: skip
    if corruptions is not None:
        ratio = corruptions["ratio"]
        checks.append(("noise corruptions <= 1.2x their 20 forward passes", f"{ratio:.2f}",
                       ratio <= 1.2))  # fmt: skip
    rows = [[name, value, "met" if ok else "**not met**"] for name, value, ok in checks]
    return [
        "### Evaluation targets",
        "",
        markdown_table(["target", "this run", ""], rows, align="lrl"),
    ]
