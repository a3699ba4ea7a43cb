"""The measured latency table: what each ResNet unit (stem, residual block at a given width, head)
adds to a whole model's batch-1 onnxruntime latency on this CPU, FP32 and INT8 (static QDQ U8S8,
the form the pipeline ships). resnet_slim/compress/latency_model.py predicts from it; the graphs
it times are made in resnet_slim/measure/latency_units.py.

Timing one unit in its own session would count the session call, and for INT8 the quantization
of its input and dequantization of its output, none of which it pays inside a model (there its
neighbours hand it quantized tensors). So:
- a block that keeps its shape is timed as chains of CHAIN_SHORT and CHAIN_LONG copies; the slope
  between them is its cost inside a model (the boundary costs are in both, and cancel);
- a unit that changes the shape (stem, head, a stride-2 block) is timed alone, minus half the
  boundary cost of its input shape and half that of its output shape. A shape's boundary cost is
  the intercept of a probe chain (1x1 conv + ReLU, or Linear for logits) at that shape: session
  call + quantize in + dequantize out, so half of it is one side plus half the call;
- the per-model constant is half the image's boundary cost plus half the logits'.
Every graph of one unit (its probes included) is timed in the same rounds, in a shuffled order
(measure/timing.py), and the cost is formed round by round: a load spike from another process
lands on one round's terms alike. The units are swept several times ("passes"), each sweep in a
new order, and each unit's cost is the median over all its rounds: another job's slow spells
(here seconds long, +60 % on INT8 blocks) then land on a minority of a unit's rounds.

Each unit is fed by an entry layer (a 1x1 conv + ReLU) as it is fed by a conv inside a model:
fed by the graph's input, onnxruntime lays out the FP32 graph otherwise (the residual stream in
NCHW, the add not fused into conv2).
"""

import hashlib
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_slim.compress.latency_model import RUNTIMES, unit_key
from resnet_slim.errors import UserError
from resnet_slim.hardware import hardware_fingerprint
from resnet_slim.io import read_json, write_json
from resnet_slim.measure.latency_units import (
    OPSET,
    build_graph,
    chain_module,
    entry_module,
    input_shape,
    keeps_shape,
    open_graph,
    open_model,
    output_shape,
    probe_key,
    probe_module,
    unit_module,
)
from resnet_slim.measure.timing import round_medians_ms

FORMAT = 1
CHAIN_SHORT, CHAIN_LONG = 1, 3
ROUND_WARMUP = 2  # untimed calls at each turn: switching sessions evicts the caches
MIN_UNIT_MS = 1e-3  # a tiny unit whose noisy difference came out <= 0 costs 1 us, not less
FINGERPRINT_KEYS = ("cpu", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "onnxruntime")


def latency_fingerprint() -> dict:
    """The CPU and onnxruntime facts a table is valid for (a cache file is per fingerprint)."""
    full = hardware_fingerprint()
    return {key: full[key] for key in FINGERPRINT_KEYS}


def measure_model_ms(
    model: nn.Module,
    image_size: int,
    *,
    runtime: str,
    threads: int = 1,
    reduce_range: bool = False,
    warmup: int = 10,
    runs: int = 30,
    repeats: int = 7,
    seed: int = 0,
) -> float:
    """A whole model's batch-1 latency (ms): the median of its per-round medians."""
    with tempfile.TemporaryDirectory() as tmp:
        call = open_model(
            model,
            image_size,
            Path(tmp),
            runtime=runtime,
            threads=threads,
            reduce_range=reduce_range,
            seed=seed,
        )
        medians = round_medians_ms(
            {"model": call},
            warmup=warmup,
            runs=runs,
            repeats=repeats,
            round_warmup=ROUND_WARMUP,
            seed=seed,
        )
    return float(np.median(medians["model"]))


# --- whole models, and timing units ---


def _slope(short: np.ndarray, long: np.ndarray) -> np.ndarray:
    """Per round: the cost of one more copy in a chain."""
    return (long - short) / (CHAIN_LONG - CHAIN_SHORT)


def _intercept(short: np.ndarray, long: np.ndarray) -> np.ndarray:
    """Per round: a chain of length 0, i.e. the graph's call, input and output alone."""
    return (CHAIN_LONG * short - CHAIN_SHORT * long) / (CHAIN_LONG - CHAIN_SHORT)


class UnitBench:
    """The settings, temp folder, graphs and boundary samples of one measure_latency_table
    call. Unit graphs are opened only while timed (a table may have hundreds); the few probe
    graphs stay open."""

    def __init__(self, folder: Path, **settings):
        self.folder, self.settings = folder, settings
        self.probes: dict[tuple, dict] = {}  # shape -> {"short": graph, "long": graph}
        self.open_probes: dict[str, dict] = {}
        self.boundary_rounds: dict[str, dict[str, list]] = {}
        self.built = 0

    def build(self, module: nn.Module, shape: tuple[int, ...]) -> dict:
        self.built += 1
        return build_graph(
            module,
            shape,
            self.folder / f"g{self.built}",
            reduce_range=self.settings["reduce_range"],
            seed=self.settings["seed"],
        )

    def chains(self, build, shape: tuple[int, ...]) -> dict:
        """{"short": graph, "long": graph} of chains built by build(length)."""
        torch.manual_seed(self.settings["seed"])
        return {
            "short": self.build(build(CHAIN_SHORT), shape),
            "long": self.build(build(CHAIN_LONG), shape),
        }

    def probe(self, shape: tuple[int, ...]) -> dict:
        if shape not in self.probes:
            chains = self.chains(partial(probe_module, shape), shape)
            self.probes[shape] = {name: {**graph, "probe": True} for name, graph in chains.items()}
        return self.probes[shape]

    def calls(self, graph: dict) -> dict:
        opened = partial(open_graph, threads=self.settings["threads"], seed=self.settings["seed"])
        if not graph.get("probe"):
            return opened(graph)
        name = str(graph["paths"]["fp32"])
        if name not in self.open_probes:
            self.open_probes[name] = opened(graph)
        return self.open_probes[name]

    def rounds(self, graphs: dict[str, dict], seed: int) -> dict[str, dict[str, np.ndarray]]:
        """{graph: {runtime: per-round medians (ms)}}, every graph and runtime in the same
        shuffled rounds."""
        calls = {
            f"{name}/{rt}": call
            for name, graph in graphs.items()
            for rt, call in self.calls(graph).items()
        }
        medians = round_medians_ms(
            calls,
            warmup=self.settings["warmup"],
            runs=self.settings["runs"],
            round_warmup=ROUND_WARMUP,
            repeats=self.settings["repeats"],
            seed=seed,
        )
        return {name: {rt: medians[f"{name}/{rt}"] for rt in RUNTIMES} for name in graphs}

    def note_boundary(self, shape: tuple[int, ...], short: dict, long: dict) -> dict:
        """Per-round boundary costs at `shape` by runtime, kept for the table's boundaries."""
        per_round = {rt: _intercept(short[rt], long[rt]) for rt in RUNTIMES}
        kept = self.boundary_rounds.setdefault(probe_key(shape), {rt: [] for rt in RUNTIMES})
        for rt in RUNTIMES:
            kept[rt].append(per_round[rt])
        return per_round

    def boundaries(self) -> dict:
        """{probe key: {"fp32_ms", "int8_ms"}}: medians over every round that timed the probe."""
        return {
            key: {f"{rt}_ms": float(np.median(np.concatenate(rounds[rt]))) for rt in RUNTIMES}
            for key, rounds in self.boundary_rounds.items()
        }


def plan_unit(spec: dict, bench: UnitBench) -> dict:
    """The graphs that time a unit: two chains of a shape-keeping block; otherwise the unit
    after its entry layer, and the probes at its input and output shapes."""
    if keeps_shape(spec):
        graphs = bench.chains(partial(chain_module, spec), input_shape(spec))
        return {"spec": spec, "how": "chain slope", "graphs": graphs}
    shapes = {"in": input_shape(spec), "out": output_shape(spec)}
    torch.manual_seed(bench.settings["seed"])
    module = nn.Sequential(entry_module(spec), unit_module(spec))
    graphs = {"alone": bench.build(module, shapes["in"])}
    for side, shape in shapes.items():
        probe = bench.probe(shape)
        graphs |= {f"{side} short": probe["short"], f"{side} long": probe["long"]}
    return {"spec": spec, "how": "alone minus entry and boundaries", "graphs": graphs}


def unit_round_costs(plan: dict, bench: UnitBench, seed: int) -> dict[str, np.ndarray]:
    """{runtime: the unit's cost in each round} from one set of rounds of its graphs."""
    medians = bench.rounds(plan["graphs"], seed)
    if "alone" not in medians:
        return {rt: _slope(medians["short"][rt], medians["long"][rt]) for rt in RUNTIMES}
    spec = plan["spec"]
    shapes = {"in": input_shape(spec), "out": output_shape(spec)}
    boundary = {
        side: bench.note_boundary(shape, medians[f"{side} short"], medians[f"{side} long"])
        for side, shape in shapes.items()
    }
    has_entry = spec["kind"] != "stem"
    return {
        rt: medians["alone"][rt]
        - (boundary["in"][rt] + boundary["out"][rt]) / 2
        - has_entry * _slope(medians["in short"][rt], medians["in long"][rt])
        for rt in RUNTIMES
    }


def _row(spec: dict, per_round: dict, how: str) -> dict:
    costs = {f"{rt}_ms": max(MIN_UNIT_MS, float(np.median(per_round[rt]))) for rt in RUNTIMES}
    return {"spec": spec, **costs, "how": how}


def measure_units(specs: dict[str, dict], bench: UnitBench, *, passes: int) -> dict:
    """{key: row} for every unit: `passes` sweeps over all units, each in a new shuffled order,
    so a unit's rounds are spread over the whole run and a slow spell of the host (another
    job's, lasting seconds) lands on a minority of them; the median over all rounds."""
    plans = {key: plan_unit(spec, bench) for key, spec in specs.items()}
    samples = {key: {rt: [] for rt in RUNTIMES} for key in plans}
    keys, seed = list(plans), bench.settings["seed"]
    rng = np.random.default_rng(seed)
    for sweep in range(passes):
        for index in rng.permutation(len(keys)):
            costs = unit_round_costs(plans[keys[index]], bench, seed + sweep)
            for rt in RUNTIMES:
                samples[keys[index]][rt].append(costs[rt])
    return {
        key: _row(
            plan["spec"], {rt: np.concatenate(samples[key][rt]) for rt in RUNTIMES}, plan["how"]
        )
        for key, plan in plans.items()
    }


def boundary_ms(shape: tuple[int, ...], bench: UnitBench, known: dict) -> dict:
    """The boundary cost at `shape` by runtime (timed now unless known)."""
    key = probe_key(shape)
    if key not in known:
        medians = bench.rounds(bench.probe(shape), bench.settings["seed"])
        bench.note_boundary(shape, medians["short"], medians["long"])
        known |= bench.boundaries()
    return known[key]


def constant_ms(specs: list[dict], bench: UnitBench, known: dict) -> dict:
    """Per model: half the image's boundary cost (its quantization, half the call) plus half
    the logits' (their dequantization, the other half): what the stem's and head's own
    costs leave out."""
    stems = [input_shape(s) for s in specs if s["kind"] == "stem"]
    heads = [(1, s["classes"]) for s in specs if s["kind"] == "head"]
    if not stems or not heads:
        raise UserError(
            "a latency table needs the model's stem and head units (table_units_for lists them)"
        )
    sides = [[boundary_ms(shape, bench, known) for shape in side] for side in (stems, heads)]
    return {
        rt: sum(float(np.mean([b[f"{rt}_ms"] for b in side])) / 2 for side in sides)
        for rt in RUNTIMES
    }


# --- the cache: one file per fingerprint / threads / reduce_range ---


def _cache_identity(fingerprint: dict, threads: int, reduce_range: bool) -> dict:
    return {"fingerprint": fingerprint, "threads": threads, "reduce_range": reduce_range}


def cache_path(cache_dir: str | Path, fingerprint: dict, threads: int, reduce_range: bool) -> Path:
    identity = json.dumps(_cache_identity(fingerprint, threads, reduce_range), sort_keys=True)
    return Path(cache_dir) / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def _valid_rows(rows) -> bool:
    def positive(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0

    return isinstance(rows, dict) and all(
        isinstance(row, dict) and all(positive(row.get(f"{rt}_ms")) for rt in RUNTIMES)
        for row in rows.values()
    )


def read_cache(path: Path, identity: dict) -> dict:
    """{"units": .., "boundaries": ..} measured before; empty (with a one-line warning) when
    the file is unreadable, corrupt or for another machine / setting."""
    empty = {"units": {}, "boundaries": {}}
    if not path.is_file():
        return empty
    try:
        cached = read_json(path, "latency cache")
    except UserError as err:
        problem = str(err)
    else:
        valid = isinstance(cached, dict) and all(_valid_rows(cached.get(part)) for part in empty)
        same = valid and all(cached.get(key) == value for key, value in identity.items())
        if same:
            return {part: cached[part] for part in empty}
        problem = f"{path}: not a latency cache for this CPU and setting"
    print(f"latency_table: warning: {problem}; ignored, re-measuring", file=sys.stderr, flush=True)
    return empty


def write_cache(path: Path, identity: dict, units: dict, boundaries: dict) -> None:
    write_json(path, {"format": FORMAT, **identity, "units": units, "boundaries": boundaries})


# --- the table ---


def _unique_specs(specs: list[dict]) -> dict[str, dict]:
    """{key: spec without the module name}, in the order first seen."""
    unique: dict[str, dict] = {}
    for spec in specs:
        plain = {k: v for k, v in spec.items() if k != "name"}
        unique.setdefault(unit_key(plain), plain)
    return unique


def measure_latency_table(
    specs: list[dict],
    *,
    threads: int = 1,
    reduce_range: bool = False,
    warmup: int = 10,
    runs: int = 30,
    repeats: int = 5,
    passes: int = 3,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """The measured cost (ms, FP32 and INT8) of every unit in `specs` inside a whole model, and
    the per-model constant. Each unit is timed in `passes` x `repeats` rounds of `runs` calls
    per graph; units already in the cache for this CPU / setting are not re-timed."""
    unique = _unique_specs(specs)
    fingerprint = latency_fingerprint()
    identity = _cache_identity(fingerprint, threads, reduce_range)
    path = cache_path(cache_dir, fingerprint, threads, reduce_range) if cache_dir else None
    cached = read_cache(path, identity) if path else {"units": {}, "boundaries": {}}
    settings = {"threads": threads, "reduce_range": reduce_range, "seed": seed}
    settings |= {"warmup": warmup, "runs": runs, "repeats": repeats, "passes": passes}
    todo = {key: spec for key, spec in unique.items() if key not in cached["units"]}
    with tempfile.TemporaryDirectory() as tmp:
        bench = UnitBench(Path(tmp), **settings)
        units = {**cached["units"], **measure_units(todo, bench, passes=passes)}
        boundaries = {**cached["boundaries"], **bench.boundaries()}
        constant = constant_ms(list(unique.values()), bench, boundaries)
    if path and (todo or boundaries.keys() - cached["boundaries"].keys()):
        write_cache(path, identity, units, boundaries)
    return {
        "format": FORMAT,
        **identity,
        "method": _method(settings),
        "units": {key: units[key] for key in unique},
        "constant_ms": constant,
    }


def _method(settings: dict) -> dict:
    return {
        "shape_keeping_blocks": f"slope between chains of {CHAIN_SHORT} and {CHAIN_LONG} copies "
        "after a 1x1 conv + ReLU entry layer",
        "shape_changing_units": "timed after the entry layer, minus the entry layer and half the "
        "boundary cost at its input and output (intercept of 1x1 conv + ReLU / Linear probe "
        "chains)",
        "constant": "half the boundary cost of the image plus half that of the logits",
        "statistic": "median over all rounds (passes x repeats, the passes sweeping every "
        "unit in a new order) of the cost formed round by round from per-round medians",
        "int8": "static QDQ U8S8, per-channel, min-max on random calibration inputs",
        "weights": "random; BN folded by the export",
        "opset": OPSET,
        "round_warmup": ROUND_WARMUP,
        **settings,
    }
