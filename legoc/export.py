"""ONNX out: an artifact's configurations as ONNX models for ONNX Runtime.

At compile time :func:`add_onnx` (the back-end stage :class:`ExportOnnx`) exports every segment
variant's torch.fx module (the very module TVM compiled) with torch.onnx (opset 17) into
``onnx/<segment>/<variant>.onnx``, listed with its sha256 in the variant's manifest entry under
``"onnx"``. :func:`export` then needs no torch:

* one configuration (``variants``: one index per block) as a single ONNX model, the segments'
  graphs joined on their boundary tensors (their inner names prefixed with the segment's);
* ``all_variants``: every segment variant as its own file in a folder, plus ``segments.json``
  (the order of the segments, the tensors each reads and writes, each variant's file), so an app
  assembles any configuration itself (:func:`merge_segments`, or one ONNX Runtime session per
  segment).

Every file written passes onnx.checker, and ONNX Runtime must reproduce the TVM artifact on
seeded random inputs (relative error at most TOLERANCE) before anything is moved into place;
an artifact built for another machine is checked against onnx.checker and run by ONNX Runtime
only.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from legoc.errors import InternalError, UserError, describe
from legoc.passes.infra import Pass, PassResult

OPSET = 17
TOLERANCE = 1e-4
SEGMENTS_JSON = "segments.json"


def add_onnx(writer, manifest: dict, state) -> None:
    """Export every segment variant of ``state`` (the compile's ProgramState) into the unfinished
    artifact of ``writer`` and list it in ``manifest`` (entries that have ``"onnx"`` are kept).
    A module torch.onnx cannot export gets ``{"error": ...}`` instead: the artifact still works,
    only its ONNX export is refused."""
    import torch

    part = state.partition
    env = part.trace_env(*state.example_inputs)
    for seg_entry, seg in zip(manifest["segments"], part.segments):
        modules = [v.gm for v in state.variants[seg.name]] if seg.is_block else [seg.gm]
        inputs = tuple(env[n] for n in seg.inputs)
        for entry, gm in zip(seg_entry["variants"], modules):
            if "onnx" in entry:
                continue
            rel = f"onnx/{seg.name}/{entry['id']}.onnx"
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(gm.eval(), inputs, str(writer.path_for(rel)), input_names=list(seg.inputs),
                                      output_names=list(seg.outputs), opset_version=OPSET, dynamo=False)
            except Exception as exc:
                entry["onnx"] = {"error": describe(exc)}
                continue
            entry["onnx"] = writer.file_entry(rel)


class ExportOnnx(Pass):
    """The back-end stage that runs :func:`add_onnx` (after the modules are built, before the
    artifact is committed)."""

    name = "export-onnx"

    def requires(self, state) -> None:
        if state.manifest is None or state.artifact is None:
            raise InternalError("export-onnx needs the built modules and their artifact (run build first)")

    def call(self, state, config) -> PassResult:
        if not config.export_onnx:   # opt-in (`legoc compile --onnx`): it adds about half the artifact's size
            return PassResult(state, False)
        add_onnx(state.artifact, state.manifest, state)
        return PassResult(state, True)


def _variants(manifest: dict, variants) -> list[int]:
    blocks = [s for s in manifest["segments"] if s["kind"] == "block"]
    if variants is None:
        return [0] * len(blocks)
    if isinstance(variants, str):
        try:
            variants = [int(v) for v in variants.split(",")]
        except ValueError:
            raise UserError(f"--variants takes comma-separated integers like 0,2,1,4, got {variants!r}") from None
    variants = list(variants)
    if len(variants) != len(blocks):
        raise UserError(f"--variants gives {len(variants)} indices; the artifact has {len(blocks)} blocks "
                        f"({', '.join(s['name'] for s in blocks)}): give one each")
    for s, i in zip(blocks, variants):
        if not 0 <= i < len(s["variants"]):
            raise UserError(f"--variants: {s['name']} has variants 0..{len(s['variants']) - 1}, not {i}")
    return variants


def _onnx_path(root: Path, seg: dict, index: int) -> Path:
    from legoc.runtime.artifact import verified_path

    entry = seg["variants"][index]
    what = f"{seg['name']}/{entry['id']}"
    info = entry.get("onnx")
    if info is None:
        raise UserError(f"{root}: {what} has no ONNX module (the artifact was compiled without them); compile it again "
                        "with this legoc")
    if "error" in info:
        raise UserError(f"{root}: {what} could not be exported to ONNX at compile time ({info['error']}); "
                        "choose other variants")
    return verified_path(root, info, f"the ONNX module of {what}")


def merge_segments(parts: list, inputs: list, outputs: list[str], name: str = "legoc"):
    """One ONNX model of segment models run in order: ``parts`` are (ModelProto, prefix)
    pairs whose graph inputs and outputs are named as the tensors between segments; every other
    name is prefixed with ``prefix``. ``inputs``: the model's ValueInfoProtos; ``outputs``: the
    tensor names it returns."""
    import onnx

    nodes, inits, infos, typed = [], [], [], {}
    opset, ir = OPSET, 8
    for model, prefix in parts:
        g = model.graph
        boundary = {v.name for v in [*g.input, *g.output]}
        rename = (lambda n, p=prefix, b=boundary: n if (not n or n in b) else f"{p}/{n}")
        for v in g.output:
            typed[v.name] = v
        for node in g.node:
            node = onnx.NodeProto.FromString(node.SerializeToString())
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            node.name = f"{prefix}/{node.name}"
            nodes.append(node)
        for t in g.initializer:
            t = onnx.TensorProto.FromString(t.SerializeToString())
            t.name = rename(t.name)
            inits.append(t)
        for v in g.value_info:
            v = onnx.ValueInfoProto.FromString(v.SerializeToString())
            v.name = rename(v.name)
            infos.append(v)
        opset = max([opset] + [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")])
        ir = max(ir, model.ir_version)
    graph = onnx.helper.make_graph(nodes, name, list(inputs), [typed[n] for n in outputs], inits, value_info=infos)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir,
                                  producer_name="legoc")


def _model_inputs(manifest: dict) -> list:
    import onnx

    return [onnx.helper.make_tensor_value_info(i["name"], onnx.TensorProto.FLOAT, i["shape"]) for i in manifest["inputs"]]


def _random_inputs(manifest: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(i["shape"]).astype(np.float32) for i in manifest["inputs"]]


def _runs_here(manifest: dict) -> bool:
    """Whether this machine runs the artifact's modules (a CPU target of this architecture)."""
    t = manifest["target"]
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return t.get("device", "cpu") == "cpu" and str(t.get("triple", "")).split("-")[0] == arch


def _leaves(out) -> list[np.ndarray]:
    if isinstance(out, dict):
        return [v for k in out for v in _leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [v for o in out for v in _leaves(o)]
    return [np.asarray(out)]


def _compare(got: list, want: list, what: str) -> float:
    if len(got) != len(want):
        raise InternalError(f"{what}: ONNX Runtime gives {len(got)} outputs, the artifact {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise InternalError(f"{what}: ONNX Runtime gives shape {g.shape}, the artifact {w.shape}")
        worst = max(worst, float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-6) if w.size else 0.0)
    if worst > TOLERANCE:
        raise InternalError(f"{what}: ONNX Runtime and the TVM artifact differ (relative error {worst:.2e} > "
                            f"{TOLERANCE}); please report it")
    return worst


def _session(model_or_path):
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _run_segments(sessions: list, xs: list, manifest: dict) -> list[np.ndarray]:
    """Run per-segment ONNX sessions in order on named tensors (what an app does with --all)."""
    from legoc.runtime.artifact import output_names

    env = {i["name"]: x for i, x in zip(manifest["inputs"], xs)}
    for sess in sessions:
        names = [o.name for o in sess.get_outputs()]
        env.update(zip(names, sess.run(None, {i.name: env[i.name] for i in sess.get_inputs()})))
    return [env[n] for n in output_names(manifest["output"])]


def _reference(artifact: Path, manifest: dict, choice: list[int], xs: list) -> list[np.ndarray] | None:
    if not _runs_here(manifest):
        return None
    from legoc.runtime import load

    return _leaves(load(artifact).configure(variants=choice)(*xs))


def export(artifact: str | os.PathLike, out: str | os.PathLike, variants=None, all_variants: bool = False) -> list[Path]:
    """Write ONNX models of ``artifact``: one configuration into the file ``out`` (``variants``:
    one index per block, a list or "0,2,1,4"; default all full size), or with ``all_variants``
    every segment variant into the folder ``out`` with ``segments.json``. Returns the files."""
    import onnx

    from legoc.runtime.artifact import output_names, read_manifest

    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    if all_variants and variants is not None:
        raise UserError("give either --variants (one configuration) or --all (every variant), not both")
    if out.exists() and (all_variants != out.is_dir()):
        raise UserError(f"{out}: exists and is {'a file' if out.is_file() else 'a folder'}; choose another output")
    if all_variants and out.is_dir() and any(out.iterdir()) and not (out / SEGMENTS_JSON).is_file():
        raise UserError(f"{out}: a folder with other files in it (not an earlier export); choose another output")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{out}: the folder {parent} does not exist; create it or choose another output")
    segments = manifest["segments"]
    xs = _random_inputs(manifest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        if not all_variants:
            choice = _variants(manifest, variants)
            picks = iter(choice)
            parts = []
            for s in segments:
                i = next(picks) if s["kind"] == "block" else 0
                parts.append((onnx.load(str(_onnx_path(artifact, s, i))), f"{s['name']}.{s['variants'][i]['id']}"))
            model = merge_segments(parts, _model_inputs(manifest), output_names(manifest["output"]),
                                   name=manifest["model"]["name"])
            onnx.checker.check_model(model, full_check=True)
            got = [np.asarray(v) for v in _session(model).run(None, dict(zip([i["name"] for i in manifest["inputs"]], xs)))]
            want = _reference(artifact, manifest, choice, xs)
            if want is not None:
                _compare(got, want, f"{out.name} (variants {','.join(map(str, choice))})")
            onnx.save(model, str(tmp / "model.onnx"))
            os.replace(tmp / "model.onnx", out)
            return [out]
        files, recipe = _write_all(artifact, manifest, tmp)
        n = min(len(s["variants"]) for s in segments if s["kind"] == "block")
        for i in range(n):   # every variant runs in one of the uniform configurations
            sessions = [_session(tmp / f) for f in
                        (s["variants"][i if s["kind"] == "block" else 0]["file"] for s in recipe["segments"])]
            want = _reference(artifact, manifest, [i] * sum(s["kind"] == "block" for s in segments), xs)
            if want is not None:
                _compare(_run_segments(sessions, xs, manifest), want, f"{out.name}: uniform variant {i}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return [out / f for f in files]
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_all(artifact: Path, manifest: dict, folder: Path) -> tuple[list[str], dict]:
    """Every segment variant's ONNX file (checked) and segments.json into ``folder``."""
    import onnx

    files, segs = [], []
    for s in manifest["segments"]:
        variants = []
        for i, v in enumerate(s["variants"]):
            name = f"{s['name']}.{v['id']}.onnx" if s["kind"] == "block" else f"{s['name']}.onnx"
            model = onnx.load(str(_onnx_path(artifact, s, i)))
            onnx.checker.check_model(model, full_check=True)
            shutil.copyfile(artifact / v["onnx"]["file"], folder / name)
            files.append(name)
            variants.append({"index": i, "id": v["id"], "ratio": v["ratio"], "macs": v["macs"], "file": name})
        segs.append({"name": s["name"], "kind": s["kind"], "inputs": s["inputs"], "outputs": s["outputs"],
                     "variants": variants})
    recipe = {"schema": "legoc.onnx-segments/1", "artifact": str(artifact), "model": manifest["model"]["name"],
              "inputs": manifest["inputs"], "output": manifest["output"], "segments": segs,
              "how": "run the segments in order, each on the tensors named in its inputs, with the variant "
                     "chosen for each block; the model's outputs are the tensors named in output"}
    (folder / SEGMENTS_JSON).write_text(json.dumps(recipe, indent=1))
    files.append(SEGMENTS_JSON)
    return files, recipe
