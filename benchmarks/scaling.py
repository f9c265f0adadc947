"""Does block-grained scaling pay? Test accuracy against measured latency, legoc vs model-grained.

    .venv/bin/python benchmarks/scaling.py [--model examples/mnist_resnet18.py] [--blocks 8]
        [--budgets 0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0] [--ratios 0,0.2,0.4,0.6,0.8] [--no-nested]
        [--out docs] [--remeasure]
    .venv/bin/python benchmarks/scaling.py --co-running examples/mnist_resnet.py examples/mnist_resnet18.py

Lines (issue 14), every latency measured end to end on compiled artifacts in a torch-free worker
process, every accuracy top-1 on the model file's ``test_data()`` (which ``legoc compile`` never
reads), computed from the compiled artifact's outputs:

* **legoc by budget**: ``legoc compile`` (host; ``--blocks``, ``--ratios``, retraining by block
  distillation), then an app that does ``load(ART, adapt_to_speed=True)``, runs the full model
  (so the runtime knows how fast this machine is right now) and steps the latency budget through
  ``--budgets`` x the full model's measured latency, down and back up: at each step
  ``configure(latency_ms=B)`` (CP-SAT), then the measured latency of its choice; a step whose
  measured median exceeds B is a budget violation.
* **legoc uniform**: every block at one ratio (no selection).
* **legoc --nested**: the same sweep on an artifact compiled with ``--nested``.
* **model-grained TVM**: ``legoc.baseline``: the whole model pruned at each ratio with legoc's
  passes (legoc's uniform architecture), fine-tuned end to end with labels + distillation; the
  fine-tuning budget of all sizes together is legoc's measured block-retraining time; compiled
  by legoc's back end (same TVM schedules). At a budget: the most accurate size whose measured
  latency fits.
* **model-grained ONNX Runtime**: the same fine-tuned networks exported to ONNX, run by ORT
  (CPU provider, all graph optimisations, 2 intra-op threads), in its own torch-free worker.

Per approach: selectable configurations, training time, bytes on disk and in memory to hold
every size, the cost of a budget step (legoc: the modules that change; model-grained: a whole
model reload). Output: ``<out>/scaling-<model>.md`` (tables) and ``.png`` (test accuracy vs
measured latency); every stage is cached under ``${LEGOC_CACHE:-~/.cache/legoc}/bench/scaling``
(compiled artifacts, baselines, measurements), so a second run only re-renders, or re-measures
(``--remeasure``), or recompiles (``--recompile``, after a change to legoc; its own caches keep
that cheap). legoc's compiles run with a cache root of their own under that
folder (trained example weights shared), so legoc's retraining time is measured, not read from a
retraining cache an earlier compile filled; it is kept from the first compile.

``--co-running A.py B.py``: 2, 4 and 6 co-running models (copies of A and B alternating; both
must have been benchmarked first) sharing one processor-time budget per period that does not
grow as apps start: joint selection (``Scheduler.configure(period_ms=P)``) vs an equal share
per model (``configure(latency_ms=P/k)``) vs model-grained (each model the most accurate
baseline size that fits P/k); mean test accuracy and measured period time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CALLS, ROUNDS, WARMUP = 30, 3, 5


# ------------------------------------------------------------------ torch-free worker process

def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _config_bytes(model, choice) -> int:
    """Bytes of module files and weights a configuration loads (what a whole-model reload reads)."""
    return model.profiles.switch_bytes(None, list(choice))


def _correct(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per test sample: 1 if the top-1 class is right (kept for paired comparisons)."""
    batch = model.input_shapes[0][0]
    out = []
    for i in range(0, len(x), batch):
        xi = x[i:i + batch]
        if len(xi) < batch:
            xi = np.concatenate([xi, np.zeros((batch - len(xi), *xi.shape[1:]), xi.dtype)])
        pred = np.asarray(model(np.ascontiguousarray(xi)))[:len(x[i:i + batch])].argmax(1)
        out.append(pred == y[i:i + batch])
    return np.concatenate(out).astype(np.uint8)


def _top1(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(_correct(model, x, y).mean())


def _sweep(path: str, budgets, x1: np.ndarray, calls: int) -> dict:
    """An app following a budget: full model first, then every budget down and back up."""
    from legoc.errors import UserError
    from legoc.runtime import load
    from legoc.runtime.model import median_latency_ms

    m = load(path, adapt_to_speed=True)
    n = len(m.blocks)
    m.configure(variants=[0] * n)
    full = median_latency_ms(m, [x1], warmup=WARMUP, calls=2 * calls)
    order = sorted(budgets, reverse=True)
    steps, prev = [], [0] * n
    for f in order + order[-2::-1]:
        budget = f * full
        t0 = time.perf_counter()
        try:
            m.configure(latency_ms=budget, best_effort=True)
        except UserError as exc:
            steps.append({"fraction": f, "budget_ms": budget, "infeasible": str(exc)})
            continue
        switch_ms = (time.perf_counter() - t0) * 1e3
        sel = m.last_selection
        choice = [int(c) for c in sel.choice]
        lat = median_latency_ms(m, [x1], warmup=2, calls=calls)
        steps.append({"fraction": f, "budget_ms": budget, "choice": choice, "est_ms": sel.estimate.latency_ms,
                      "within_budget": sel.within_budget,
                      "est_accuracy": sel.estimate.accuracy, "measured_ms": lat, "switch_ms": switch_ms,
                      "modules_loaded": m.last_switch_loaded,
                      "bytes_loaded": m.profiles.switch_bytes(prev, choice) if m.last_switch_loaded else 0,
                      "blocks_changed": sum(a != b for a, b in zip(prev, choice)), "slowdown": m.slowdown()})
        prev = choice
    return {"full_ms": full, "steps": steps}


def _swap_and_reload(path: str, repeat: int = 5) -> dict:
    """Whole-model reload (load + configure full) vs a one-block swap to a variant not loaded yet."""
    from legoc.runtime import load

    probe = load(path).configure()
    n, k = len(probe.blocks), min(len(b.variants) for b in probe.blocks)
    full = [0] * n
    reload_ms = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        load(path).configure(variants=full)
        reload_ms.append((time.perf_counter() - t0) * 1e3)
    out = {"reload_ms": statistics.median(reload_ms), "reload_bytes": _config_bytes(probe, full)}
    if k > 1:
        swap_ms, swap_bytes = [], []
        for b in range(n):
            m = load(path).configure(variants=full)
            new = list(full)
            new[b] = 1
            t0 = time.perf_counter()
            m.configure(variants=new)
            swap_ms.append((time.perf_counter() - t0) * 1e3)
            swap_bytes.append(m.profiles.switch_bytes(full, new))
        out |= {"swap_ms": statistics.median(swap_ms), "swap_ms_per_block": swap_ms,
                "swap_bytes": statistics.median(swap_bytes)}
    return out


def worker_tvm(req: dict) -> dict:
    """Sweeps, then every (artifact, configuration) timed in interleaved rounds and scored on the
    test split, then reload and swap costs."""
    from legoc.runtime import load
    from legoc.runtime.model import median_latency_ms

    with np.load(req["test"]) as d:
        x, y = d["x"], d["y"]
    x1 = np.ascontiguousarray(x[:1])
    sweeps = {name: _sweep(req["artifacts"][name], req["budgets"], x1, req["calls"]) for name in req["scalable"]}
    items = [tuple(i) for i in req["items"]]
    for name, s in sweeps.items():
        items += [(name, tuple(st["choice"])) for st in s["steps"] if "choice" in st]
    items = list(dict.fromkeys((a, tuple(c)) for a, c in items))
    models = {name: load(path) for name, path in req["artifacts"].items()}
    times = {it: [] for it in items}
    for r in range(req["rounds"]):
        for it in items:
            m = models[it[0]].configure(variants=list(it[1]))
            times[it] += median_latency_ms(m, [x1], warmup=WARMUP if r == 0 else 2,
                                           calls=max(1, req["calls"] // req["rounds"]), all_times=True)
    results = []
    for it in items:
        m = models[it[0]].configure(variants=list(it[1]))
        correct = _correct(m, x, y)
        results.append({"artifact": it[0], "choice": list(it[1]), "latency_ms": statistics.median(times[it]),
                        "accuracy": float(correct.mean()), "correct": "".join(map(str, correct)),
                        "memory_bytes": m.profiles.estimate(list(it[1])).memory_bytes})
    costs = {name: _swap_and_reload(path) for name, path in req["artifacts"].items()}
    return {"sweeps": sweeps, "configs": results, "costs": costs,
            "disk_bytes": {name: _dir_bytes(Path(p)) for name, p in req["artifacts"].items()}}


def worker_ort(req: dict) -> dict:
    """Every ONNX model: session load time, latency in interleaved rounds, test accuracy."""
    import onnxruntime as ort

    with np.load(req["test"]) as d:
        x, y = d["x"], d["y"]
    x1 = np.ascontiguousarray(x[:1])
    sessions, load_ms = {}, {}
    for name, path in req["onnx"].items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = req["threads"]
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        sessions[name] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        load_ms[name] = (time.perf_counter() - t0) * 1e3
    times = {name: [] for name in sessions}
    for r in range(req["rounds"]):
        for name, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: x1}
            for _ in range(WARMUP if r == 0 else 2):
                sess.run(None, feed)
            for _ in range(max(1, req["calls"] // req["rounds"])):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, sess in sessions.items():
        iname = sess.get_inputs()[0].name
        correct = [int(sess.run(None, {iname: np.ascontiguousarray(x[i:i + 1])})[0].argmax(1)[0] == y[i])
                   for i in range(len(x))]
        out[name] = {"latency_ms": statistics.median(times[name]), "accuracy": sum(correct) / len(x),
                     "correct": "".join(map(str, correct)),
                     "load_ms": load_ms[name], "disk_bytes": Path(req["onnx"][name]).stat().st_size}
    return out


def _period_ms(models, inputs, calls: int) -> float:
    """Median time of one period: every model run once, in turn."""
    times = []
    for r in range(calls + 2):
        t0 = time.perf_counter()
        for m, x in zip(models, inputs):
            m(x)
        if r >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def worker_corun(req: dict) -> dict:
    """k co-running models share one processor-time budget per period P: joint selection
    (Scheduler), an equal share P/k each, and model-grained (the most accurate baseline size
    whose measured latency fits P/k). Measured: one period's wall time; test accuracy of each
    model's configuration (computed here on its own test split)."""
    from legoc.runtime import Scheduler, load

    data = {}
    for t in {m["test"] for m in req["models"]}:
        with np.load(t) as d:
            data[t] = (d["x"], d["y"])
    accuracy: dict = {}

    def acc(path, choice, test):
        key = (path, tuple(choice))
        if key not in accuracy:
            accuracy[key] = _top1(load(path).configure(variants=list(choice)), *data[test])
        return accuracy[key]

    out = []
    for k in req["counts"]:
        specs = [req["models"][i % len(req["models"])] for i in range(k)]
        xs = [np.ascontiguousarray(data[s["test"]][0][:1]) for s in specs]
        models = [load(s["artifact"], adapt_to_speed=True) for s in specs]
        for m, x in zip(models, xs):     # the running apps know this machine's speed
            m.configure(variants=[0] * len(m.blocks))
            for _ in range(12):
                m(x)
        budget = req["period_ms"]
        row = {"models": k, "period_budget_ms": budget}
        sel = Scheduler(models).configure(period_ms=budget, best_effort=True)
        row["joint"] = {"choices": [list(c) for c in sel.choices], "period_ms": _period_ms(models, xs, req["calls"]),
                        "within_budget": sel.within_budget,
                        "accuracy": [acc(s["artifact"], c, s["test"]) for s, c in zip(specs, sel.choices)]}
        equal, fits = [], True
        for m in models:   # a share no configuration meets: the fastest (best effort)
            m.configure(latency_ms=budget / k, best_effort=True)
            equal.append(list(m.last_selection.choice))
            fits = fits and m.last_selection.within_budget
        row["equal"] = {"choices": equal, "period_ms": _period_ms(models, xs, req["calls"]), "within_budget": fits,
                        "accuracy": [acc(s["artifact"], c, s["test"]) for s, c in zip(specs, equal)]}
        picks = []
        for s in specs:
            fit = [b for b in s["baselines"] if b["latency_ms"] <= budget / k]
            picks.append(max(fit, key=lambda b: b["accuracy"]) if fit else min(s["baselines"], key=lambda b: b["latency_ms"]))
        grained = [load(b["artifact"]).configure() for b in picks]
        row["model_grained"] = {"choices": [b["name"] for b in picks], "period_ms": _period_ms(grained, xs, req["calls"]),
                                "accuracy": [b["accuracy"] for b in picks]}
        out.append(row)
    return {"rows": out}


def run_worker(kind: str, request: dict, timeout_s: float = 7200) -> dict:
    """One worker in a fresh interpreter (no torch imported by this file in it)."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--worker", kind], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"scaling worker {kind} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- compile stages

def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"scaling: {msg}", file=sys.stderr, flush=True)


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def _private_cache(root: Path, main_cache: Path) -> Path:
    """A cache root for legoc's compiles in this benchmark; the trained example weights are shared."""
    private = root / "legoc-cache"
    private.mkdir(parents=True, exist_ok=True)
    link = private / "examples"
    if not link.exists():
        (main_cache / "examples").mkdir(parents=True, exist_ok=True)
        link.symlink_to(main_cache / "examples")
    return private


def stage_compile(model: Path, root: Path, name: str, args, nested: bool) -> dict:
    """legoc compile (cached by model file and options; ``--recompile`` after changing legoc: its
    own caches make that cheap); legoc's retraining time is kept from the first compile that
    retrained anything."""
    from legoc.paths import cache_dir
    from legoc.pipeline import CompileConfig, compile_model

    options = {"blocks": args.blocks, "ratios": args.ratios, "nested": nested,
               "retrain_minutes": args.retrain_minutes, "retrain_epochs": args.retrain_epochs,
               "torch_threads": args.torch_threads}
    key = _digest(model.read_bytes(), options)
    art = root / f"{name}.lego"
    info_path = root / f"{name}.json"
    info = _read(info_path)
    if info and info.get("key") == key and art.exists() and not args.recompile:
        return info
    main_cache = cache_dir()
    private = _private_cache(root, main_cache)
    old = os.environ.get("LEGOC_CACHE")
    os.environ["LEGOC_CACHE"] = str(private)
    _log(f"legoc compile {model.name} {options} -> {art}")
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    try:
        report = compile_model(model, CompileConfig(target="host", output=art, blocks=args.blocks,
                                                    ratios=tuple(args.ratios), nested=nested, progress=True,
                                                    retrain_minutes=args.retrain_minutes,
                                                    retrain_epochs=args.retrain_epochs))
    finally:
        if old is None:
            os.environ.pop("LEGOC_CACHE", None)
        else:
            os.environ["LEGOC_CACHE"] = old
    wall = time.perf_counter() - t0
    retrain = [v.get("retrain") for s in report.manifest["segments"] for v in s["variants"] if v.get("retrain")]
    trained_now = any(not r.get("cached", True) for r in retrain)
    seconds = report.timings.get("recalibrate", 0.0) + report.timings.get("retrain", 0.0)
    first = _read(root / f"{name}-retrain.json")
    if trained_now:
        first = {"seconds": seconds, "cached_variants": sum(bool(r.get("cached")) for r in retrain),
                 "variants": len(retrain), "timings": report.timings}
        _write(root / f"{name}-retrain.json", first)
    elif first is None:
        raise SystemExit(f"legoc's retraining came from {private / 'retrain'} without a record of its time "
                         "(an interrupted run?); delete that folder and run again")
    info = {"key": key, "artifact": str(art), "timings": report.timings, "wall_seconds": wall,
            "load": [load0, os.getloadavg()[0]],
            "retrain_seconds": first["seconds"], "retrain_record": first}
    _write(info_path, info)
    return info


def stage_baselines(spec, root: Path, args, seconds_total: float) -> dict:
    """Model-grained sizes: prune, fine-tune (budget ``seconds_total`` split over the pruned
    sizes), compile, export ONNX. Cached per size."""
    import torch

    from legoc.baseline import BaselineConfig, compile_pruned, export_onnx, finetune, prune_uniform
    from legoc.modelfile import call_hook
    from legoc.pipeline import train_batches, val_batches

    pruned_sizes = [r for r in args.ratios if r > 0]
    per_size = seconds_total / max(1, len(pruned_sizes))
    out = {}
    train = val = None
    for r in args.ratios:
        cfg = BaselineConfig(ratio=r, seconds=per_size if r > 0 else 0.0, blocks=args.blocks,
                             num_threads=args.torch_threads)
        key = _digest(spec.path.read_bytes(), repr(cfg))
        name = f"baseline-r{r:.2f}"
        info = _read(root / f"{name}.json")
        if info and info.get("key") == key and Path(info["artifact"]).exists() and Path(info["onnx"]).exists() \
                and not args.recompile:
            out[name] = info
            continue
        if train is None:
            tb = train_batches(spec)
            train = [(x[0], t) for x, t in zip(tb["train_inputs"], tb["train_targets"])]
            val = val_batches(spec)["val_batches"]
        _log(f"model-grained baseline at ratio {r}: fine-tuning for {cfg.seconds:.0f} s")
        pruned = prune_uniform(spec.model, spec.example_inputs, cfg, source=str(spec.path),
                               concrete_args=spec.concrete_args)
        report = {"ratio": r, "epochs": 0, "seconds": 0.0}
        if r > 0:
            evaluate = (lambda m, d: float(call_hook(spec.path, "evaluate", spec.evaluate, m, d))) \
                if spec.evaluate else None
            report = finetune(pruned, spec.model, train, cfg, val=val, evaluate=evaluate, log=_log)
        art, onnx = root / f"{name}.lego", root / f"{name}.onnx"
        compile_pruned(pruned, spec.example_inputs, art, progress=True)
        with torch.no_grad():
            export_onnx(pruned, spec.example_inputs, onnx)
        info = {"key": key, "artifact": str(art), "onnx": str(onnx), "macs": pruned.macs,
                "param_bytes": pruned.param_bytes, "finetune": report}
        _write(root / f"{name}.json", info)
        out[name] = info
    return out


# ------------------------------------------------------------------------------ reporting

def _pick(points: list[dict], budget: float):
    """The most accurate point whose measured latency fits ``budget`` (None if none fits)."""
    fit = [p for p in points if p["latency_ms"] <= budget]
    return max(fit, key=lambda p: (p["accuracy"], -p["latency_ms"])) if fit else None


def _paired(a: str, b: str) -> tuple[float, float]:
    """Mean difference of two per-sample correctness strings (a - b) and its 95% half-width
    (normal approximation of the paired differences; same test samples for both)."""
    d = np.frombuffer(a.encode(), np.uint8).astype(float) - np.frombuffer(b.encode(), np.uint8).astype(float)
    return float(d.mean()), float(1.96 * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ms(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _mib(b) -> str:
    return f"{b / 2**20:.1f} MiB"


def report(model: Path, root: Path, results: dict, out_dir: Path, args) -> str:
    tvm, ort = results["tvm"], results["ort"]
    configs = {(c["artifact"], tuple(c["choice"])): c for c in tvm["configs"]}
    full_ms = tvm["sweeps"]["legoc"]["full_ms"]
    baselines = sorted(results["baselines"])
    base_tvm = [dict(configs[(b, tuple([0] * results["blocks"]))], name=b) for b in baselines]
    base_ort = [dict(ort[b], name=b) for b in baselines]
    uniform = [configs[("legoc", tuple([i] * results["blocks"]))] for i in range(len(args.ratios))]
    lines = [f"# Does block-grained scaling pay? — `{model.name}`", ""]
    load = results.get("load") or {}
    cond = (f"load average (1 min) {load['measure'][0]:.2f} before and {load['measure'][1]:.2f} after the timing, "
            f"{load['compile'][0]:.2f}–{load['compile'][1]:.2f} around legoc's compile; " if load else "")
    lines += [f"Measured {results['date']} on this machine ({results['host']}); {cond}one run. "
              "Latency: end to end, batch 1, torch-free worker process, "
              f"median of {args.calls} calls in {ROUNDS} interleaved rounds (budget sweeps: median of {args.calls} "
              f"calls right after each switch). Accuracy: top-1 on the {results['test_samples']} test digits "
              "(never seen by `legoc compile`), computed from the compiled artifacts' outputs.", ""]
    # -- by budget
    lines += ["## Accuracy at each latency budget", "",
              f"Budget = fraction × the full model's latency measured by the app at the start "
              f"({full_ms:.2f} ms). legoc: the CP-SAT choice of `load(..., adapt_to_speed=True).configure(latency_ms=B)`, "
              "its test accuracy and its latency measured right after the switch (✗: above the budget; "
              "†: no configuration's estimate met the budget, so the app got the one that exceeds it least, "
              "`best_effort=True`); the budget is stepped down then back up and both passes are shown (down / up). "
              "Model-grained and uniform: the most accurate size whose latency measured in the interleaved rounds "
              "fits. Δ: legoc by budget (the less accurate of its two passes) minus model-grained TVM, in points, "
              "with a 95% interval from the paired per-digit differences.", ""]
    head = "| budget | ms | legoc by budget (down / up) | legoc ms (down / up) |"
    sep = "|---:|---:|---|---|"
    if "nested" in tvm["sweeps"]:
        head += " legoc --nested | nested ms |"
        sep += "---|---|"
    head += " legoc uniform | model-grained TVM | model-grained ORT | Δ legoc − TVM |"
    sep += "---:|---:|---:|---:|"
    lines += [head, sep]
    summary = {"violations": 0, "steps": 0, "rows": []}

    def by_budget(name):
        per = {}
        for st in tvm["sweeps"][name]["steps"]:
            per.setdefault(st["fraction"], []).append(st)
        return per

    legoc_steps = by_budget("legoc")
    nested_steps = by_budget("nested") if "nested" in tvm["sweeps"] else {}

    def cell(steps, name):
        accs, mss = [], []
        for st in steps:
            if "choice" not in st:
                accs.append("infeasible")
                mss.append("—")
                continue
            acc = configs[(name, tuple(st["choice"]))]["accuracy"]
            over = st["measured_ms"] > st["budget_ms"]
            dagger = "" if st.get("within_budget", True) else " †"
            accs.append(f"{_pct(acc)} `{''.join(map(str, st['choice']))}`{dagger}")
            mss.append(f"{st['measured_ms']:.2f}{' ✗' if over else ''}")
        return " / ".join(accs), " / ".join(mss)

    for f in sorted(legoc_steps):
        budget = f * full_ms
        steps = legoc_steps[f]
        for st in steps:
            if "choice" in st:
                summary["steps"] += 1
                summary["violations"] += st["measured_ms"] > st["budget_ms"]
        la, lm = cell(steps, "legoc")
        row = f"| {int(round(f * 100))}% | {budget:.2f} | {la} | {lm} |"
        if nested_steps:
            na, nm = cell(nested_steps.get(f, []), "nested")
            row += f" {na} | {nm} |"
        u, bt, bo = _pick(uniform, budget), _pick(base_tvm, budget), _pick(base_ort, budget)
        row += f" {_pct(u and u['accuracy'])} | {_pct(bt and bt['accuracy'])} | {_pct(bo and bo['accuracy'])} |"
        chosen = [configs[("legoc", tuple(st["choice"]))] for st in steps if "choice" in st]
        worst = min(chosen, key=lambda c: c["accuracy"]) if chosen else None
        diff = None
        if worst and bt and "correct" in worst and "correct" in bt:
            diff = _paired(worst["correct"], bt["correct"])
            row += f" {100 * diff[0]:+.1f} ± {100 * diff[1]:.1f} |"
        else:
            row += " — |"
        lines.append(row)
        summary["rows"].append({"fraction": f, "legoc": worst and worst["accuracy"],
                                "uniform": u and u["accuracy"], "tvm": bt and bt["accuracy"],
                                "ort": bo and bo["accuracy"], "diff": diff})
    infeasible = sum("choice" not in st for st in tvm["sweeps"]["legoc"]["steps"])
    best_effort = sum(not st.get("within_budget", True) for st in tvm["sweeps"]["legoc"]["steps"] if "choice" in st)
    summary |= {"infeasible": infeasible, "best_effort": best_effort}
    lines += ["", f"legoc's budget steps with a measured latency above the budget: {summary['violations']} of "
                  f"{summary['steps']} ({100 * (1 - summary['violations'] / max(1, summary['steps'])):.0f}% within); "
                  f"of all steps, {best_effort} had no configuration estimated to fit (†) and {infeasible} raised an "
                  "error.", ""]
    # -- every measured point
    lines += ["## Every measured configuration", "",
              "| approach | configuration | MMACs | latency ms | test accuracy |", "|---|---|---:|---:|---:|"]
    macs = results["macs"]
    for c in sorted(tvm["configs"], key=lambda c: (c["artifact"], c["latency_ms"])):
        mm = macs.get(c["artifact"], {}).get(",".join(map(str, c["choice"])))
        lines.append(f"| {c['artifact']} | `{''.join(map(str, c['choice']))}` | {mm / 1e6 if mm else 0:.1f} | "
                     f"{c['latency_ms']:.2f} | {_pct(c['accuracy'])} |")
    for b in baselines:
        lines.append(f"| {b} (ONNX Runtime) | whole model | {results['baselines'][b]['macs'] / 1e6:.1f} | "
                     f"{ort[b]['latency_ms']:.2f} | {_pct(ort[b]['accuracy'])} |")
    # -- per approach
    costs, disk = tvm["costs"], tvm["disk_bytes"]
    n_blocks, n_var = results["blocks"], len(args.ratios)
    lines += ["", "## What each approach costs", "",
              "| approach | selectable configurations | training time | bytes on disk (every size) | "
              "bytes in memory (every size loaded) | budget step (one level) |", "|---|---:|---:|---:|---:|---|"]
    legoc_prof = results["legoc_memory_all"]
    steps_ms = [st for st in tvm["sweeps"]["legoc"]["steps"] if st.get("modules_loaded")]
    step_desc = (f"{statistics.median(s['switch_ms'] for s in steps_ms):.1f} ms, "
                 f"{statistics.median(s['bytes_loaded'] for s in steps_ms) / 2**20:.2f} MiB loaded (median of "
                 f"{len(steps_ms)} steps that loaded modules); one-block swap {costs['legoc']['swap_ms']:.1f} ms"
                 if steps_ms else "—")
    lines.append(f"| legoc by budget | {n_var ** n_blocks:,} | {results['legoc_retrain_s']:.0f} s (block retraining) | "
                 f"{_mib(disk['legoc'])} | {_mib(legoc_prof)} | {step_desc} |")
    if "nested" in disk:
        lines.append(f"| legoc --nested | {n_var ** n_blocks:,} | {results['nested_retrain_s']:.0f} s | "
                     f"{_mib(disk['nested'])} | {_mib(results['nested_memory_all'])} | one-block swap "
                     f"{costs['nested']['swap_ms']:.1f} ms |")
    lines.append(f"| legoc uniform | {n_var} | (the same artifact) | | | |")
    ft = sum(results["baselines"][b]["finetune"]["seconds"] for b in baselines)
    reload = statistics.median(costs[b]["reload_ms"] for b in baselines)
    reload_b = statistics.median(costs[b]["reload_bytes"] for b in baselines)
    lines.append(f"| model-grained TVM | {len(baselines)} | {ft:.0f} s (end-to-end fine-tuning) | "
                 f"{_mib(sum(disk[b] for b in baselines))} | {_mib(sum(results['baseline_memory'][b] for b in baselines))} | "
                 f"whole reload {reload:.1f} ms, {reload_b / 2**20:.2f} MiB (median over sizes) |")
    lines.append(f"| model-grained ORT | {len(baselines)} | (the same networks) | "
                 f"{_mib(sum(ort[b]['disk_bytes'] for b in baselines))} | — | session load "
                 f"{statistics.median(ort[b]['load_ms'] for b in baselines):.1f} ms (median) |")
    full_reload = costs["legoc"]["reload_ms"]
    lines += ["", f"Whole-model reload of legoc's full configuration: {full_reload:.1f} ms; one-block swap "
                  f"{costs['legoc']['swap_ms']:.1f} ms (median over blocks; per block "
                  f"{', '.join(f'{v:.1f}' for v in costs['legoc']['swap_ms_per_block'])} ms): "
                  f"{full_reload / costs['legoc']['swap_ms']:.1f}x cheaper.", ""]
    # -- speedup per MAC reduction
    lines += ["## Speedup per MAC reduction (uniform configurations, measured end to end)", "",
              "| ratio | MMACs | latency ms | MAC reduction | speedup | speedup / MAC reduction |",
              "|---:|---:|---:|---:|---:|---:|"]
    m0, l0 = macs["legoc"][",".join(["0"] * n_blocks)], uniform[0]["latency_ms"]
    for i, u in enumerate(uniform):
        mi = macs["legoc"][",".join([str(i)] * n_blocks)]
        lines.append(f"| {args.ratios[i]:.1f} | {mi / 1e6:.1f} | {u['latency_ms']:.2f} | {m0 / mi:.2f}x | "
                     f"{l0 / u['latency_ms']:.2f}x | {(l0 / u['latency_ms']) / (m0 / mi):.2f} |")
    lines += ["", "![test accuracy vs measured latency](" + f"scaling-{model.stem}.png)", ""]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"scaling-{model.stem}.md").write_text(text)
    _plot(model, results, configs, base_tvm, base_ort, uniform, out_dir / f"scaling-{model.stem}.png")
    results["summary"] = summary
    return text


def _plot(model, results, configs, base_tvm, base_ort, uniform, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tvm = results["tvm"]
    fig, ax = plt.subplots(figsize=(8, 5))

    def sweep_points(name):
        pts = {}
        for st in tvm["sweeps"][name]["steps"]:
            if "choice" in st:
                c = configs[(name, tuple(st["choice"]))]
                pts[tuple(st["choice"])] = (c["latency_ms"], c["accuracy"])
        return sorted(pts.values())

    for name, label, style in (("legoc", "legoc by budget", "o-"), ("nested", "legoc --nested by budget", "s-")):
        if name in tvm["sweeps"]:
            p = sweep_points(name)
            ax.plot([a for a, _ in p], [100 * b for _, b in p], style, label=label)
    for pts, label, style in ((uniform, "legoc uniform", "^--"), (base_tvm, "model-grained (TVM)", "D-"),
                              (base_ort, "model-grained (ONNX Runtime)", "v-")):
        p = sorted((q["latency_ms"], q["accuracy"]) for q in pts)
        ax.plot([a for a, _ in p], [100 * b for _, b in p], style, label=label)
    ax.set_xlabel("measured latency, ms (batch 1, this machine)")
    ax.set_ylabel(f"test accuracy, % ({results['test_samples']} digits)")
    ax.set_title(f"{model.name}: test accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main

def run(args) -> int:
    import platform

    import torch

    from legoc.modelfile import call_hook, load_model_file
    from legoc.paths import cache_dir
    from legoc.runtime.artifact import read_manifest
    from legoc.runtime.estimate import Profiles

    torch.set_num_threads(args.torch_threads)
    model = Path(args.model).resolve()
    root = cache_dir() / "bench" / "scaling" / f"{model.stem}-{_digest(model.read_bytes(), args.blocks, args.ratios)}"
    root.mkdir(parents=True, exist_ok=True)
    spec = load_model_file(model)
    if spec.test_data is None:
        raise SystemExit(f"{model} has no test_data(): this benchmark reports test accuracy only")
    xs, ys = zip(*[(torch.as_tensor(b[0]).numpy(), torch.as_tensor(b[1]).numpy())
                   for b in call_hook(spec.path, "test_data", spec.test_data)])
    np.savez(root / "test.npz", x=np.concatenate(xs).astype(np.float32), y=np.concatenate(ys))
    legoc = stage_compile(model, root, "legoc", args, False)
    nested = None if args.no_nested else stage_compile(model, root, "nested", args, True)
    baselines = stage_baselines(spec, root, args, legoc["retrain_seconds"])
    artifacts = {"legoc": legoc["artifact"], **{b: i["artifact"] for b, i in baselines.items()}}
    if nested:
        artifacts["nested"] = nested["artifact"]
    n = sum(s["kind"] == "block" for s in read_manifest(Path(legoc["artifact"]))["segments"])
    items = [("legoc", [i] * n) for i in range(len(args.ratios))] + [(b, [0] * n) for b in baselines]
    if nested:
        items += [("nested", [i] * n) for i in range(len(args.ratios))]
    request = {"test": str(root / "test.npz"), "artifacts": artifacts,
               "scalable": ["legoc"] + (["nested"] if nested else []), "budgets": list(args.budgets),
               "items": items, "calls": args.calls, "rounds": ROUNDS}
    mkey = _digest(request, [(Path(p) / "manifest.json").read_bytes() for p in artifacts.values()])
    measured = _read(root / "measured.json")
    if args.remeasure or not measured or measured.get("key") != mkey:
        _log(f"measuring {len(artifacts)} artifacts in a torch-free worker (flock /tmp/legoc-timing.lock)")
        with open("/tmp/legoc-timing.lock", "w") as lock:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
            load0 = os.getloadavg()[0]
            tvm = run_worker("tvm", request)
            ort = run_worker("ort", {"test": str(root / "test.npz"), "calls": args.calls, "rounds": ROUNDS,
                                     "threads": 2, "onnx": {b: i["onnx"] for b, i in baselines.items()}})
        measured = {"key": mkey, "tvm": tvm, "ort": ort, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load": [load0, os.getloadavg()[0]]}
        _write(root / "measured.json", measured)
    macs, memory = {}, {}
    for name, path in artifacts.items():
        prof = Profiles(read_manifest(Path(path)))
        macs[name] = {}
        for c in measured["tvm"]["configs"]:
            if c["artifact"] == name:
                macs[name][",".join(map(str, c["choice"]))] = sum(v["macs"] for v in _chosen(path, c["choice"]))
        memory[name] = prof.memory_of([v for vs in prof.blocks for v in vs] + list(prof.frame))
    results = {"model": str(model), "date": measured["date"], "host": f"{platform.machine()}, {os.cpu_count()} cores",
               "test_samples": int(sum(len(y) for y in ys)), "blocks": n, "tvm": measured["tvm"],
               "ort": measured["ort"], "baselines": baselines, "macs": macs,
               "legoc_retrain_s": legoc["retrain_seconds"], "legoc_memory_all": memory["legoc"],
               "load": {"measure": measured.get("load", [float("nan")] * 2),
                        "compile": legoc.get("load", [float("nan")] * 2)},
               "baseline_memory": {b: memory[b] for b in baselines}, "legoc_compile": legoc}
    if nested:
        results |= {"nested_retrain_s": nested["retrain_seconds"], "nested_memory_all": memory["nested"]}
    text = report(model, root, results, Path(args.out), args)
    _write(root / "results.json", results)
    print(text)
    return 0


def co_running(paths: list[str], args) -> int:
    """2, 4, 6 co-running copies of the benchmarked models (their results must exist)."""
    from legoc.paths import cache_dir

    models = []
    for p in paths:
        p = Path(p).resolve()
        found = sorted((cache_dir() / "bench" / "scaling").glob(f"{p.stem}-*/results.json"),
                       key=lambda f: f.stat().st_mtime)
        if not found:
            raise SystemExit(f"run benchmarks/scaling.py --model {p} first")
        res = json.loads(found[-1].read_text())
        n = res["blocks"]
        configs = {(c["artifact"], tuple(c["choice"])): c for c in res["tvm"]["configs"]}
        baselines = [{"name": b, "artifact": i["artifact"], "latency_ms": configs[(b, (0,) * n)]["latency_ms"],
                      "accuracy": configs[(b, (0,) * n)]["accuracy"]} for b, i in sorted(res["baselines"].items())]
        models.append({"name": p.stem, "artifact": res["legoc_compile"]["artifact"], "test": str(found[-1].parent / "test.npz"),
                       "full_ms": res["tvm"]["sweeps"]["legoc"]["full_ms"], "baselines": baselines})
    period = sum(m["full_ms"] for m in models)
    request = {"models": models, "counts": args.counts, "period_ms": period, "calls": args.calls}
    with open("/tmp/legoc-timing.lock", "w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_worker("corun", request)
    names = " and ".join(m["name"] for m in models)
    lines = [f"## Co-running models: {names}", "",
             f"Copies of {names} (alternating) share one processor-time budget of {period:.2f} ms per period "
             f"(what one copy of each needs at full size), whatever the number of apps: each app's share shrinks as "
             "apps start. Measured: one period (every model once, in turn), median of "
             f"{args.calls}; ✗ above the budget. Accuracy: mean test accuracy over the models.", "",
             "| models | joint (Scheduler) | period ms | equal share | period ms | model-grained | period ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = []
        for key in ("joint", "equal", "model_grained"):
            a = r[key]
            over = " ✗" if a["period_ms"] > r["period_budget_ms"] else ""
            cells += [f"{100 * statistics.mean(a['accuracy']):.1f}%", f"{a['period_ms']:.2f}{over}"]
        lines.append(f"| {r['models']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out) / "scaling-corunning.md"
    out.write_text(text)
    _write(cache_dir() / "bench" / "scaling" / "corunning.json", {"request": request, "result": result})
    print(text)
    return 0


def _chosen(path, choice) -> list[dict]:
    """Manifest entries of the frame and the chosen block variants."""
    from legoc.runtime.artifact import read_manifest

    segs = read_manifest(Path(path))["segments"]
    out, k = [], 0
    for s in segs:
        if s["kind"] == "block":
            out.append(s["variants"][choice[k]])
            k += 1
        else:
            out.append(s["variants"][0])
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        request = json.loads(sys.stdin.read())
        result = {"tvm": worker_tvm, "ort": worker_ort, "corun": worker_corun}[argv[1]](request)
        print(json.dumps(result, default=float))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "mnist_resnet18.py"))
    ap.add_argument("--blocks", type=int, default=None, help="as legoc compile --blocks (default: legoc's)")
    ap.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--budgets", type=lambda s: [float(v) for v in s.split(",")], default=list(BUDGETS))
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--no-nested", action="store_true")
    ap.add_argument("--remeasure", action="store_true", help="time everything again (compiles stay cached)")
    ap.add_argument("--recompile", action="store_true", help="compile and fine-tune again (after changing legoc)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--retrain-minutes", type=float, default=10.0,
                    help="legoc compile --retrain-minutes (the baseline gets the wall-clock legoc's retraining took)")
    ap.add_argument("--retrain-epochs", type=int, default=10, help="legoc compile --retrain-epochs")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="PyTorch threads for legoc's retraining and the baseline's fine-tuning alike (default 1: on "
                         "a shared, loaded 2-core machine two spinning OpenMP threads per process ran slower than one)")
    ap.add_argument("--co-running", nargs="+", metavar="MODEL.py", help="co-running copies of these benchmarked models")
    ap.add_argument("--counts", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 6])
    args = ap.parse_args(argv)
    return co_running(args.co_running, args) if args.co_running else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
