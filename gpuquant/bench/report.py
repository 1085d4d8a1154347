"""Results files: JSON (contract section 3), markdown table, PNG plot, run summary.

Everything here works from the results document alone (the dict written to
``DIR/<suite>.json``), so committed results can be re-rendered later (``readme_table``).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import textwrap
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .ceilings import fraction_of_ceiling
from .harness import HEADER_FIELDS, ROW_FIELDS, pair_rows

__all__ = ["speedup", "annotate", "validate_doc", "write_json", "load_json", "render_markdown",
           "notes_markdown", "write_markdown", "write_png", "summary_lines", "choose_x_param", "geomean"]


#: a row whose p80 time exceeds NOISY x its p20 time is flagged in the markdown
NOISY = 1.5


def speedup(baseline_ms: Optional[float], provider_ms: Optional[float]) -> Optional[float]:
    """Ratio to the baseline as a speedup: ``baseline_ms / provider_ms`` (> 1: faster than
    the baseline); None when either time is missing or not positive."""
    if baseline_ms is None or provider_ms is None or baseline_ms <= 0 or provider_ms <= 0:
        return None
    return baseline_ms / provider_ms


def geomean(values: Sequence[float]) -> Optional[float]:
    """Geometric mean of the values that are not None; None when there are none.

    Raises:
        ValueError: a value that is not a finite number > 0 (a ratio of times never is).
    """
    vals = [v for v in values if v is not None]
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                math.isfinite(v) and v > 0):
            raise ValueError(f"geomean: values must be finite numbers > 0, got {v!r}")
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def validate_doc(doc: Mapping[str, Any]) -> None:
    """Raise ValueError if ``doc`` does not follow contract section 3."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"a results document is a JSON object, got {type(doc).__name__}")
    missing = [k for k in HEADER_FIELDS + ("rows",) if k not in doc]
    if missing:
        raise ValueError(f"results document lacks header fields {missing}")
    for k in ("device", "torch", "gpuquant", "date", "command"):
        if not isinstance(doc[k], str):
            raise ValueError(f"header field {k!r} must be a string, got {doc[k]!r}")
    for k in ("triton", "cupy"):
        if doc[k] is not None and not isinstance(doc[k], str):
            raise ValueError(f"header field {k!r} must be a string or null, got {doc[k]!r}")
    try:
        datetime.datetime.fromisoformat(doc["date"])
    except ValueError:
        raise ValueError(f"header field 'date' must be ISO 8601, got {doc['date']!r}") from None
    if not isinstance(doc["rows"], list):
        raise ValueError(f"'rows' must be a list, got {type(doc['rows']).__name__}")
    for i, row in enumerate(doc["rows"]):
        if not isinstance(row, Mapping) or set(row) != set(ROW_FIELDS):  # (any key order)
            raise ValueError(f"row {i} has fields {list(row)}, expected {list(ROW_FIELDS)}")
        for k in ("suite", "case", "provider", "unit"):
            if not isinstance(row[k], str):
                raise ValueError(f"row {i}: {k} must be a string, got {row[k]!r}")
        if not isinstance(row["params"], dict) or not all(
                isinstance(v, (str, bool, int)) or v is None
                or (isinstance(v, float) and math.isfinite(v)) for v in row["params"].values()):
            raise ValueError(f"row {i}: params must be an object of finite JSON scalars, got "
                             f"{row['params']!r}")
        for k in ("median_ms", "p20_ms", "p80_ms", "throughput"):
            if not isinstance(row[k], (int, float)) or isinstance(row[k], bool) \
                    or not math.isfinite(row[k]) or row[k] < 0:
                raise ValueError(f"row {i}: {k} must be a finite number >= 0, got {row[k]!r}")
        if not row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]:
            raise ValueError(f"row {i}: expected p20 <= median <= p80, got {row['p20_ms']}, "
                             f"{row['median_ms']}, {row['p80_ms']}")
        if not (row["exact_vs_numpy"] is None or isinstance(row["exact_vs_numpy"], bool)):
            raise ValueError(f"row {i}: exact_vs_numpy must be true, false or null, got "
                             f"{row['exact_vs_numpy']!r}")


GRAPH = "-graph"  # providers replaying CUDA graphs: compared with the baseline's graph row


def ratio_base(provider: str, baseline: Optional[str], by_provider: Mapping[str, Any]):
    """The provider ``provider`` is compared with: ``<baseline>-graph`` for a ``-graph`` row
    when the same params have one (graph against graph: both without host time), else the
    document's baseline."""
    if baseline and provider.endswith(GRAPH) and provider != baseline + GRAPH \
            and baseline + GRAPH in by_provider:
        return baseline + GRAPH
    return baseline


def annotate(doc: Mapping[str, Any]) -> List[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """Pair the rows by params and add, per row, ``ratio`` (speedup vs the document's
    ``baseline`` provider for the same params, or vs its ``-graph`` row for a ``-graph``
    provider (:func:`ratio_base`); None if there is no such row), ``ratio_vs`` (that
    provider's name) and ``fraction`` (of the ceiling for the row's unit, None where
    undefined).

    Returns ``[(params, [row + {"ratio", "ratio_vs", "fraction"}, ...]), ...]`` with the
    baseline first.
    """
    baseline = doc.get("baseline")
    ceilings = doc.get("ceilings")
    out = []
    for params, by_provider in pair_rows(doc["rows"]):
        names = sorted(by_provider, key=lambda n: (n != baseline, list(by_provider).index(n)))
        rows = []
        for n in names:
            r = dict(by_provider[n])
            r["ratio_vs"] = ratio_base(n, baseline, by_provider)
            base = by_provider.get(r["ratio_vs"])
            r["ratio"] = speedup(base["median_ms"], r["median_ms"]) if base else None
            r["fraction"] = fraction_of_ceiling(r["throughput"], r["unit"], ceilings)
            rows.append(r)
        out.append((params, rows))
    return out


def write_json(doc: Mapping[str, Any], path: str) -> None:
    """Validate ``doc`` and write it to ``path`` whole or not at all (a temporary file, then
    renamed): the lease kills a suite at its deadline, and a kill during the rewrite of
    ``<suite>.partial.json`` after a case left a truncated file (every row measured so far
    lost, and ``readme_table`` refusing the folder)."""
    validate_doc(doc)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)  # strict JSON (no bare NaN / Infinity)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    try:
        validate_doc(doc)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return doc


# ---------------------------------------------------------------------------------- markdown
def _num(v: Optional[float]) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(v) -> str:
    return str(v).replace("|", "\\|")


def notes_markdown(doc: Mapping[str, Any]) -> str:
    """The notes under a suite's table (``<suite>.md``): the autotune mode, the providers
    unavailable here and why, the errors."""
    def items(title, lines):
        return f"\n{title}:\n\n" + "".join(f"- {' '.join(str(x).split())}\n" for x in lines) \
            if lines else ""
    text = f"\nTriton autotuning: `{doc['triton_tune']}` (`GPUQUANT_TRITON_TUNE`).\n" \
        if doc.get("triton_tune") else ""
    text += items("Unavailable here", [f"`{p}`: {why}" for p, why in
                                       (doc.get("unavailable") or {}).items()])
    return text + items("Errors", doc.get("errors") or [])


def render_markdown(doc: Mapping[str, Any], heading_level: int = 2) -> str:
    """The suite's table: one line per (case, provider), the case's params in the first
    columns (shown once per case), median ms with [p20, p80], throughput, speedup vs the
    baseline provider, fraction of the ceiling and exactness vs the NumPy oracle."""
    validate_doc(doc)
    suite = doc.get("suite") or (doc["rows"][0]["suite"] if doc["rows"] else "?")
    baseline = doc.get("baseline")
    h = "#" * heading_level
    lines = [f"{h} `{suite}` on {doc['device']}", ""]
    lines.append(f"{doc['date']} · `{doc['command']}` · gpuquant {doc['gpuquant']}, torch "
                 f"{doc['torch']}, triton {doc['triton']}, cupy {doc['cupy']}")
    lines.append("")
    host = doc.get("host") or {}
    if isinstance(host.get("thread_env"), dict):  # (files from before it was recorded: none)
        env = ", ".join(f"{k}={v}" for k, v in host["thread_env"].items() if v is not None)
        lines.append(f"Host: {host.get('cpus')} CPUs, torch threads {host.get('torch_threads')}; "
                     f"{env or 'BLAS / OpenMP threads not pinned (their defaults)'}.")
        lines.append("")
    ceilings = doc.get("ceilings") or {}
    if ceilings:
        parts = [f"{kind}: {_num(c['value'])} {c['unit']} ({c['what']})"
                 for kind, c in ceilings.items()]
        lines.append("Ceilings measured in the same run: " + "; ".join(parts) + ".")
        lines.append("")
    groups = annotate(doc)
    if not groups:
        lines.append("(no rows)")
        return "\n".join(lines) + "\n"
    keys: List[str] = []
    for params, _ in groups:
        keys += [k for k in params if k not in keys]
    any_exact = any(r["exact_vs_numpy"] is not None for _, rows in groups for r in rows)
    any_frac = any(r["fraction"] is not None for _, rows in groups for r in rows)
    head = keys + ["provider", "median ms [p20, p80]", "throughput", f"vs {baseline}"]
    head += ["of ceiling"] * any_frac + ["exact vs numpy"] * any_exact
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < len(keys) + 1 else "---:"
                                for i in range(len(head))) + "|")
    any_noisy = False
    for params, rows in groups:
        for i, r in enumerate(rows):
            cells = [_cell(params.get(k, "")) if i == 0 else "" for k in keys]
            cells.append(f"`{r['provider']}`")
            noisy = r["p80_ms"] > NOISY * r["p20_ms"]
            any_noisy |= noisy
            cells.append(f"{_num(r['median_ms'])} [{_num(r['p20_ms'])}, {_num(r['p80_ms'])}]"
                         + (" †" if noisy else ""))
            cells.append(f"{_num(r['throughput'])} {r['unit']}")
            cells.append("-" if r["ratio"] is None else f"{r['ratio']:.2f}x")
            if any_frac:
                cells.append("-" if r["fraction"] is None else f"{100 * r['fraction']:.0f}%")
            if any_exact:
                cells.append({True: "yes", False: "**NO**", None: "-"}[r["exact_vs_numpy"]])
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    graph_vs = baseline is not None and any(r.get("ratio_vs") == baseline + GRAPH
                                            and r["provider"] != baseline + GRAPH
                                            for _, rows in groups for r in rows)
    lines.append(f"`vs {baseline}`: speedup, {baseline}'s median time / the provider's "
                 f"(same params, same run)."
                 + (f" `-graph` rows: vs `{baseline}{GRAPH}` (CUDA graph against CUDA graph)."
                    if graph_vs else "")
                 + (f" †: p80 > {NOISY} x p20, the machine was busy; read with care."
                    if any_noisy else ""))
    return "\n".join(lines) + "\n" + notes_markdown(doc)


def write_markdown(doc: Mapping[str, Any], path: str) -> None:
    with open(path, "w") as f:
        f.write(render_markdown(doc))


# ---------------------------------------------------------------------------------- plot
def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def choose_x_param(rows: Sequence[Mapping[str, Any]], preferred: Optional[str] = None) -> Optional[str]:
    """The param plotted on the x axis: ``preferred`` if every row has it, else the numeric
    param with the most distinct values, else the param with the most distinct values."""
    if not rows:
        return None
    common = [k for k in rows[0]["params"] if all(k in r["params"] for r in rows)]
    if preferred in common:
        return preferred
    if not common:
        return None

    def distinct(k):
        return len({json.dumps(r["params"][k]) for r in rows})

    numeric = [k for k in common if all(_is_num(r["params"][k]) for r in rows)]
    pool = numeric or common
    return max(pool, key=lambda k: (distinct(k), -common.index(k)))


def write_png(doc: Mapping[str, Any], path: str, x_param: Optional[str] = None,
              max_panels: int = 12) -> None:
    """Throughput against size, one line per provider; one panel per combination of the
    other params (at most ``max_panels``). Uses matplotlib's Agg canvas (no display, no
    change to matplotlib's global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    validate_doc(doc)
    rows = doc["rows"]
    x = choose_x_param(rows, x_param)
    # panel label: the params other than x that vary (constant ones go to the title)
    values: Dict[str, set] = {}
    for r in rows:
        for k, v in r["params"].items():
            values.setdefault(k, set()).add(json.dumps(v))
    constant = {k for k, vs in values.items() if len(vs) == 1 and all(k in r["params"] for r in rows)}
    panels: Dict[str, List[Mapping[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={v}" for k, v in r["params"].items()
                          if k != x and k not in constant) or doc.get("suite", "")
        panels.setdefault(textwrap.fill(label, 60), []).append(r)
    fixed = ", ".join(f"{k}={rows[0]['params'][k]}" for k in rows[0]["params"]
                      if k in constant and k != x) if rows else ""
    labels = list(panels)[:max_panels]
    n = max(1, len(labels))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    suite = doc.get("suite", "")
    fig.suptitle(f"{suite} on {doc['device']} ({doc['date'][:10]})" + (f"; {fixed}" if fixed else "")
                 + (f" - first {max_panels} of {len(panels)} panels" if len(panels) > max_panels else ""))
    for i, label in enumerate(labels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        prs = panels[label]
        numeric_x = x is not None and all(_is_num(r["params"].get(x)) for r in prs)
        cats: List[str] = []
        if not numeric_x:
            for r in prs:
                c = str(r["params"].get(x, ""))
                if c not in cats:
                    cats.append(c)
        for prov in dict.fromkeys(r["provider"] for r in prs):
            pts = [r for r in prs if r["provider"] == prov]
            if numeric_x:
                pts.sort(key=lambda r: r["params"][x])
                xs = [r["params"][x] for r in pts]
            else:
                xs = [cats.index(str(r["params"].get(x, ""))) for r in pts]
            ax.plot(xs, [r["throughput"] for r in pts], marker="o",
                    linewidth=2.2 if prov == doc.get("baseline") else 1.4,
                    linestyle="--" if prov == doc.get("baseline") else "-", label=prov)
        if numeric_x:
            xs_all = [r["params"][x] for r in prs]
            if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 16:
                ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(x or "")
        ax.set_ylabel(prs[0]["unit"])
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------------- summary
def summary_lines(docs: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per (suite, provider): cases, geometric-mean speedup vs the baseline with its
    range, best fraction of the ceiling, exactness count."""
    lines = []
    for doc in docs:
        suite = doc.get("suite", "?")
        baseline = doc.get("baseline")
        # keyed by (provider, the provider its ratio is against): a -graph row is compared
        # graph against graph where that row exists, else with the eager baseline; the two
        # are separate lines, never one mean under one name
        per: Dict[tuple, Dict[str, list]] = {}
        for _, rows in annotate(doc):
            for r in rows:
                d = per.setdefault((r["provider"], r["ratio_vs"]),
                                   {"ratio": [], "frac": [], "exact": [], "vs": r["ratio_vs"]})
                d["ratio"].append(r["ratio"])
                d["frac"].append(r["fraction"])
                d["exact"].append(r["exact_vs_numpy"])
        for (prov, _), d in per.items():
            rs = [v for v in d["ratio"] if v is not None]
            g = geomean(rs)
            text = f"  {suite:<14} {prov:<24} {len(d['ratio']):>3} cases"
            if prov == baseline:
                text += "   (baseline)"
            elif g is not None:
                text += f"   {g:6.2f}x vs {d['vs']} (geomean; {min(rs):.2f}x..{max(rs):.2f}x)"
            fr = [v for v in d["frac"] if v is not None]
            if fr:
                text += f"   up to {100 * max(fr):.0f}% of ceiling"
            ex = [v for v in d["exact"] if v is not None]
            if ex:
                text += f"   exact {sum(ex)}/{len(ex)}"
            lines.append(text)
    return lines


def write_all(doc: Mapping[str, Any], out_dir: str, x_param: Optional[str] = None) -> List[str]:
    """Write ``<suite>.json``, ``.md`` and ``.png`` into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, doc["suite"])
    write_json(doc, base + ".json")
    write_markdown(doc, base + ".md")
    write_png(doc, base + ".png", x_param=x_param)
    return [base + ".json", base + ".md", base + ".png"]
