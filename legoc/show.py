"""What ``legoc inspect`` prints: an artifact's segments and variants with their figures, the
source of its accuracy figures, the combinations measured at compile time and the test-split
accuracy recorded by ``legoc evaluate --record``."""
from __future__ import annotations

from pathlib import Path


def cell(x, spec: str) -> str:
    """A table cell: ``x`` formatted by ``spec``, or ``-`` for None."""
    return "-" if x is None else format(x, spec)


def print_artifact(con, path: str | Path, m: dict) -> None:
    """The whole report of the artifact at ``path`` (manifest ``m``) on the rich console ``con``."""
    from rich.table import Table

    model, tgt = m["model"], m["target"]
    con.print(f"[bold]{path}[/]: model {model['name']} ({model['source']}), target {tgt['name']} "
              f"({tgt['triple']}, {tgt['device']}); {model['scalable_share']:.1%} of "
              f"{model['total_macs'] / 1e6:.2f} M MACs in blocks; retrained: {m['retrained']}")
    t = Table(title="segments (in execution order)")
    for col in ("segment", "kind", "in → out", "variant", "ratio", "MACs (M)", "params (KiB)", "peak act. (KiB)",
                "latency (ms)", "energy (mJ)", "acc. drop", "module (KiB)"):
        t.add_column(col, justify="right" if col not in ("segment", "kind", "in → out", "variant") else "left",
                     no_wrap=col in ("latency (ms)", "energy (mJ)"))   # "gpu ~0.16 cpu ~0.33" stays one line
    energies, energy_note = _energies(m)
    for s in m["segments"]:
        shapes = " → ".join(",".join("×".join(map(str, s["tensors"][n]["shape"])) for n in names)
                            for names in (s["inputs"], s["outputs"]))
        for k, v in enumerate(s["variants"]):
            t.add_row(s["name"] if k == 0 else "", s["kind"] if k == 0 else "", shapes if k == 0 else "",
                      v["id"], f"{v['ratio']:.2f}", f"{v['macs'] / 1e6:.2f}", f"{v['param_bytes'] / 1024:.1f}",
                      _profile(v, "peak_activation_bytes", 1 / 1024, ".1f"), _latencies(v, m),
                      energies.get((s["name"], k), "-"),
                      _drop(v),
                      f"{v['module']['bytes'] / 1024:.0f}")
        t.add_section()
    con.print(t)
    con.print(energy_note)
    con.print("structure: " + "  ".join(
        f"{s['name']}({','.join(s['inputs'])} → {','.join(s['outputs'])})" for s in m["segments"]))
    print_estimates(con, m)
    if m.get("tiling"):
        print_tiling(con, path, m["tiling"])


def _step_name(step: dict) -> str:
    """A plan step's blocks, with their variant indices when the plan chose variants."""
    blocks = step["blocks"]
    what = blocks[0] if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
    variants = step.get("variants") or []
    return what + (f" (variant {'+'.join(str(v) for v in variants)})" if any(variants) else "")


def tiling_lines(tiling: dict) -> list[str]:
    """The tiling plan in a few lines: its source, its steps, the blocks that stay whole."""
    links = "; ".join(f"worker {w} {k['rtt_ms']:.2f} ms round trip, {cell(k['mbit_s'], '.0f')} Mbit/s"
                      for w, k in enumerate(tiling["links"]))
    lines = [f"tiling plan over {tiling['workers']} workers ({tiling['source']}; links: {links}): estimate "
             f"{tiling['estimate_ms']:.2f} ms for the blocks, {tiling['all_local_ms']:.2f} ms all here"]
    if tiling.get("budget_ms") is not None:
        lines.append(f"  variants chosen with the placement within {tiling['budget_ms']:g} ms: estimated accuracy "
                     f"drop {tiling['drop']:.4f}")
    for s in tiling["steps"]:
        what = _step_name(s)
        where = ("here" if not s["tiles"] else ", ".join(f"worker {t['worker']} rows {t['rows_out'][0]}-{t['rows_out'][1]}"
                                                          for t in s["tiles"]))
        lines.append(f"  {what}: {where}, {s['estimate_ms']:.2f} ms")
    lines += [f"  {u['block']} stays whole: {u['reason']}" for u in tiling["untileable"]]
    if not any(s["tiles"] for s in tiling["steps"]):
        lines.append("  the plan keeps every block here: tiling would not pay with these workers and links")
    return lines


def print_tiling(con, path: str | Path, tiling: dict) -> None:
    """The tiling plan (``legoc compile --tiles``): one row per tile (and per local step), its
    rows, halo, bytes and estimated ms, next to what ``legoc run --cluster --record`` measured."""
    from rich.markup import escape
    from rich.table import Table

    from legoc.runtime.tiled import MEASURED, read_measured

    measured = read_measured(path) or {}
    by_step = {tuple(r["blocks"]): r for r in measured.get("steps", []) if r.get("blocks")}
    t = Table(title=f"tiling plan over {tiling['workers']} workers ({tiling['source']}): "
                    f"{tiling['estimate_ms']:.2f} ms estimated for the blocks, {tiling['all_local_ms']:.2f} ms all here")
    for col in ("blocks", "worker", "rows in", "rows out", "halo rows", "bytes in / out (KiB)", "est. ms",
                "measured ms"):
        t.add_column(col, justify="left" if col in ("blocks", "worker") else "right")
    for s in tiling["steps"]:
        what = _step_name(s)
        got = by_step.get(tuple(s["blocks"]), {})
        if not s["tiles"]:
            t.add_row(what, "here", "-", "-", "-", "-", f"{s['estimate_ms']:.2f}", cell(got.get("measured_ms"), ".2f"))
            t.add_section()
            continue
        tiles_ms = got.get("tiles_ms") or []
        for k, tile in enumerate(s["tiles"]):
            t.add_row(what if k == 0 else "", str(tile["worker"]), "{}-{}".format(*tile["rows_in"]),
                      "{}-{}".format(*tile["rows_out"]), str(tile["halo_rows"]),
                      f"{tile['bytes_in'] / 1024:.1f} / {tile['bytes_out'] / 1024:.1f}", f"{tile['estimate_ms']:.2f}",
                      cell(tiles_ms[k] if k < len(tiles_ms) else None, ".2f"))
        t.add_row("", "step", "", "", "", "", f"{s['estimate_ms']:.2f}", cell(got.get("measured_ms"), ".2f"))
        t.add_section()
    con.print(t)
    for u in tiling["untileable"]:
        con.print(f"{u['block']} stays whole: {escape(u['reason'])}")
    con.print(f"plan: {escape(tiling['how'])}")
    if tiling.get("budget_ms") is not None:
        con.print(f"variants chosen with the placement within {tiling['budget_ms']:g} ms: estimated accuracy drop "
                  f"{tiling['drop']:.4f}")
    if measured:
        con.print(f"measured ms: `legoc run --cluster --record` on {measured['created']} over {measured['workers']}, "
                  f"{measured['calls']} call(s), {measured['total_ms']:.2f} ms end to end; a tile's figure is its "
                  f"worker's round trip (send, run, receive); kept in {MEASURED}, outside the signed manifest")
    else:
        con.print("measured ms: none recorded; run `legoc run ART --cluster HOST:PORT,... --record`")


def print_estimates(con, m: dict) -> None:
    """Accuracy source, and the compile-time validation of the combination estimators."""
    acc = m.get("accuracy")
    if acc:
        con.print(f"accuracy: {acc['metric']} = {acc['baseline']:.4f} at full size; drops per variant from "
                  f"{acc['how']}")
        cal = acc.get("calibration")
        if cal:
            alpha = "none" if cal.get("alpha") is None else f"{cal['alpha']:.4g} per unit of signal"
            con.print(f"acc. drop column: the estimate the solver uses (measured drop ±95% interval); signal: "
                      f"{acc.get('signal')}; calibration: alpha {alpha}; {cal.get('how')}")
    val = (m.get("combination") or {}).get("validation") or []
    if val:
        print_validation(con, val)
    print_evaluation(con, m.get("evaluation"))


def print_validation(con, val: list[dict]) -> None:
    """The compile-time measured combinations, the latency fit's calibration points (in-sample)
    apart from the held-out ones, with the mean latency error of each group."""
    from rich.table import Table

    groups = [("held out", [v for v in val if v.get("fitted") is False]),
              ("fitted (in-sample: the estimators' calibration points)", [v for v in val if v.get("fitted") is True]),
              ("fit status not recorded (older artifact)", [v for v in val if "fitted" not in v])]
    t = Table(title="combinations measured at compile time (val split): estimate vs measurement")
    for col in ("points", "variants", "acc. est.", "acc. meas.", "latency est. (ms)", "latency meas. (ms)",
                "latency error", "memory est. (MiB)"):
        t.add_column(col, justify="left" if col in ("points", "variants") else "right")
    summary = []
    for name, rows in groups:
        if not rows:
            continue
        errors = []
        for k, v in enumerate(rows):
            e, me = v["estimated"], v["measured"]
            err = None
            if e["latency_ms"] is not None and me.get("latency_ms"):
                err = (e["latency_ms"] - me["latency_ms"]) / me["latency_ms"]
                errors.append(abs(err))
            t.add_row(name if k == 0 else "", " ".join(map(str, v["choice"])), cell(e["accuracy"], ".4f"),
                      cell(me.get("accuracy"), ".4f"), cell(e["latency_ms"], ".2f"), cell(me.get("latency_ms"), ".2f"),
                      cell(err, "+.1%"), f"{e['memory_bytes'] / 2**20:.2f}")
        t.add_section()
        if errors:
            summary.append(f"{name.split(' (')[0]} {sum(errors) / len(errors):.1%} over {len(errors)}")
    con.print(t)
    if summary:
        con.print("mean |latency error|: " + "; ".join(summary))


def print_evaluation(con, ev: dict | None) -> None:
    """Accuracy on the model file's test split recorded by `legoc evaluate --record`."""
    if not ev:
        con.print("test-split accuracy: not recorded; run `legoc evaluate ART model.py --record` "
                  "(compile never reads test_data())")
        return
    from rich.table import Table

    t = Table(title=f"accuracy on {ev['samples']} samples of {ev['model_file']}'s {ev['split']}_data() "
                    f"({ev['metric']}; legoc evaluate, {ev['created']})")
    for col in ("configuration", "variants", "est. acc. (val)", f"{ev['split']} acc.", "est. latency (ms)"):
        t.add_column(col, justify="left" if col in ("configuration", "variants") else "right")
    for r in ev["results"]:
        t.add_row(r["label"], ",".join(map(str, r["choice"])), cell(r["est_accuracy"], ".4f"),
                  f"{r['accuracy']:.4f}", cell(r["est_latency_ms"], ".3f"))
    con.print(t)


def _energies(m: dict) -> tuple[dict, str]:
    """The energy cell of every variant ((segment, index) -> text: one call at the reference clocks,
    every device's with --devices, marked like latency: ~ estimated, * measured on the board over
    RPC or by its helper, no mark measured here) and a line on where the figures come from."""
    from legoc.errors import UserError
    from legoc.runtime.estimate import Profiles

    try:
        prof = Profiles(m)
    except UserError as exc:
        return {}, f"energy: - ({exc})"
    why = prof.energy_unavailable()
    if why is not None:
        return {}, f"energy: unavailable: {why}"
    cells = {}
    blocks, frames = iter(prof.device_costs), iter(prof.frame)   # the costs the solver uses, in segment order
    for s in m["segments"]:
        if s["kind"] == "block":
            costs = [list(per_device.items()) for per_device in next(blocks)]
        else:
            costs = [[(prof.frame_device, next(frames))]]
        for k, per_device in enumerate(costs):
            parts = []
            for d, cost in per_device:
                e = prof.option_energy_mj(cost, d)
                mark = {"measured-local": "", "measured-rpc": "*"}.get(cost.energy_source or "", "~")
                parts.append("-" if e is None else f"{mark}{e:.3f}")
            cells[(s["name"], k)] = parts[0] if len(parts) == 1 else " ".join(
                f"{d} {p}" for (d, _), p in zip(per_device, parts))
    if prof.power is None:
        return cells, "energy column: measured per call (no power model: no DVFS levels)"
    levels = "; ".join(f"{d} " + ", ".join(f"{lv.mhz:g}" for lv in dev.levels) + f" MHz (active {dev.levels[0].active_w:.2f}-"
                       f"{dev.levels[-1].active_w:.2f} W, reference {dev.reference_mhz:g})"
                       for d, dev in prof.power.devices.items())
    return cells, (f"energy column: one call at the reference clocks; ~ estimated: the board's active power x latency "
                   f"(legoc.runtime.energy), from target {prof.target_name}'s power model, DVFS levels {levels}; "
                   f"switching {prof.power.switch_nj_per_byte:g} nJ per byte loaded; each figure's reference is in the "
                   "manifest (target.power)")


def _drop(variant: dict) -> str:
    """The accuracy-drop cell: the estimate, then the measured drop with its 95% interval."""
    fig = (variant.get("profile") or {}).get("accuracy_drop")
    if not fig or fig.get("value") is None:
        return "-"
    ci = fig.get("measured_ci95")
    if not fig.get("measured") or ci is None:
        return f"{fig['value']:+.4f}"
    measured = sum(fig["measured"].values()) / len(fig["measured"])
    return f"{fig['value']:+.4f} ({measured:+.4f} ±{(ci[1] - ci[0]) / 2:.4f})"


def _latencies(variant: dict, manifest: dict) -> str:
    """The latency cell: the default device's, then every other device's (``--devices``)."""
    own = _profile(variant, "latency_ms", 1, ".2f")
    others = variant.get("devices") or {}
    if not others:
        return own
    default = (manifest.get("devices") or {}).get("default", "")
    return " ".join([f"{default} {own}"] + [f"{d} {_profile(e, 'latency_ms', 1, '.2f')}" for d, e in others.items()])


def _profile(variant: dict, key: str, scale: float, fmt: str) -> str:
    """A profile figure with its source marked: ~ estimated, * measured over RPC, - none."""
    fig = variant.get("profile", {}).get(key)
    if not fig or fig.get("value") is None:
        return "-"
    mark = {"estimated": "~", "measured-rpc": "*"}.get(fig.get("source"), "")
    return f"{mark}{fig['value'] * scale:{fmt}}"
